-- Roles and databases of the team stack, one each: MLflow's tracking store (mlflow), MLflow's
-- auth store (mlflow_auth) and Prefect's database (prefect). Idempotent: a second run only
-- resets the passwords. Both launchers run it as the superuser, with the passwords as psql
-- variables so that none is written in git:
--
--   psql -v ON_ERROR_STOP=1 -v mlflow_password=... -v mlflow_auth_password=... \
--        -v prefect_password=... -f docker/postgres/init.sql
--
-- Prefect creates its pg_trgm extension itself as the database owner.
SELECT format('CREATE ROLE %I LOGIN', name)
  FROM unnest(ARRAY['mlflow', 'mlflow_auth', 'prefect']) AS name
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name)
\gexec

ALTER ROLE mlflow WITH LOGIN PASSWORD :'mlflow_password';
ALTER ROLE mlflow_auth WITH LOGIN PASSWORD :'mlflow_auth_password';
ALTER ROLE prefect WITH LOGIN PASSWORD :'prefect_password';

SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L', name, name, 'UTF8')
  FROM unnest(ARRAY['mlflow', 'mlflow_auth', 'prefect']) AS name
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = name)
\gexec

-- Each role reaches its own database only.
REVOKE CONNECT ON DATABASE mlflow, mlflow_auth, prefect FROM PUBLIC;
GRANT CONNECT ON DATABASE mlflow TO mlflow;
GRANT CONNECT ON DATABASE mlflow_auth TO mlflow_auth;
GRANT CONNECT ON DATABASE prefect TO prefect;
