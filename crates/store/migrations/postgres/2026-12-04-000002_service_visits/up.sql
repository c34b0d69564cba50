-- A car's service visits. The write path deletes a car's visits (each with its event) before the
-- car, so the foreign key never cascades: it refuses, as a guard against a path that forgets.
CREATE TABLE service_visits (
    id BIGSERIAL PRIMARY KEY,
    car_id BIGINT NOT NULL REFERENCES cars (id),
    garage VARCHAR(100) NOT NULL,
    mileage BIGINT NOT NULL,
    notes TEXT NOT NULL DEFAULT '',
    visited_on VARCHAR(10) NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE INDEX service_visits_car_id ON service_visits (car_id, id);
