-- A private car is visible to its owner and staff only (Record::readers).
ALTER TABLE cars ADD COLUMN private BOOLEAN NOT NULL DEFAULT 0;
