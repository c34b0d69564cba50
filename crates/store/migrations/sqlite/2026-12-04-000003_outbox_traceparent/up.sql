-- The W3C trace context of the write that committed the event (when tracing is on), so that
-- its publish, inline or by the relay later, is linked to the write's trace.
ALTER TABLE event_outbox ADD COLUMN traceparent VARCHAR(55);
