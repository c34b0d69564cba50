DROP TABLE blacklisted_tokens;
DROP TABLE users;
