#!/bin/sh
# The target database's first start, after 10-target-bootstrap.sql created the roles: the two
# login roles get the passwords of .env (docker-compose.yml's target service).
set -eu
psql -v ON_ERROR_STOP=1 --username postgres --dbname conveyor_target \
  -v platform="$TARGET_PLATFORM_PASSWORD" -v provisioner="$TARGET_PROVISIONER_PASSWORD" <<'SQL'
ALTER ROLE conveyor_platform PASSWORD :'platform';
ALTER ROLE conveyor_provisioner PASSWORD :'provisioner';
SQL
