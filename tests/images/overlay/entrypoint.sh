#!/bin/sh
# edgefit TEST image entrypoint for PgBouncer 1.18 (Debian package), after edoburu/pgbouncer's:
# runs as uid 70; when /etc/pgbouncer/pgbouncer.ini is absent it writes a minimal one from
# DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME, LISTEN_PORT, AUTH_TYPE, POOL_MODE,
# MAX_CLIENT_CONN, DEFAULT_POOL_SIZE; then execs the command (pgbouncer refuses to run as root).
set -e
ini=/etc/pgbouncer/pgbouncer.ini
if [ ! -e "$ini" ] && [ -n "$DB_HOST" ] && [ -w /etc/pgbouncer ]; then
	auth_file=/etc/pgbouncer/userlist.txt
	if [ -n "$DB_USER" ] && [ ! -e "$auth_file" ]; then
		printf '"%s" "%s"\n' "$DB_USER" "$DB_PASSWORD" > "$auth_file"
		chmod 0600 "$auth_file"
	fi
	cat > "$ini" <<EOINI
[databases]
* = host=${DB_HOST} port=${DB_PORT:-5432}${DB_NAME:+ dbname=$DB_NAME}

[pgbouncer]
listen_addr = ${LISTEN_ADDR:-0.0.0.0}
listen_port = ${LISTEN_PORT:-5432}
unix_socket_dir =
auth_type = ${AUTH_TYPE:-scram-sha-256}
auth_file = ${auth_file}
pool_mode = ${POOL_MODE:-session}
max_client_conn = ${MAX_CLIENT_CONN:-100}
default_pool_size = ${DEFAULT_POOL_SIZE:-20}
ignore_startup_parameters = extra_float_digits
EOINI
	echo "$0: wrote $ini from the environment"
fi
exec "$@"
