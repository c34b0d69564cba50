DROP TABLE event_outbox;
DROP TABLE cars;
DROP TABLE blacklisted_tokens;
DROP TABLE users;
