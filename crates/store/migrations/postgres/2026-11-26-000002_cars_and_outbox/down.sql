DROP TABLE event_outbox;
DROP TABLE cars;
