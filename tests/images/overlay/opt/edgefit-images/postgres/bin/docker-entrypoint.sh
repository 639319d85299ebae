#!/usr/bin/env bash
# edgefit TEST image entrypoint for Postgres 15 (Debian package), written to honour the
# contract of the official Debian-based `postgres` image's docker-entrypoint.sh:
#   POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required unless
#   POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_DB (default $POSTGRES_USER),
#   POSTGRES_INITDB_ARGS, POSTGRES_HOST_AUTH_METHOD (default scram-sha-256),
#   PGDATA (default /var/lib/postgresql/data);
#   initdb on first start, then /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz once;
#   started as root it prepares directories and re-runs itself as uid 999 (postgres);
#   `postgres -c ...` arguments are passed through to the server (and to the temporary
#   init server, so config_file=/hba_file= mounts are honoured during init as well).
set -Eeo pipefail

# The official image accepts `-c x=y` without the leading `postgres`.
if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

want_help() {
	local arg
	for arg; do
		case "$arg" in
			-'?'|--help|--describe-config|-V|--version) return 0 ;;
		esac
	done
	return 1
}

if [ "$1" != 'postgres' ] || want_help "$@"; then
	exec "$@"
fi

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export POSTGRES_USER POSTGRES_DB

mkdir -p "$PGDATA"
chmod 00700 "$PGDATA" 2>/dev/null || :
mkdir -p /var/run/postgresql
chmod 03775 /var/run/postgresql 2>/dev/null || :

if [ "$(id -u)" = '0' ]; then
	# Only files not already ours: a large data directory is not walked again on restart.
	find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
	find /var/run/postgresql \! -user postgres -exec chown postgres:postgres '{}' +
	# setpriv (util-linux) stands in for the official image's gosu: same effect, no extra package.
	HOME=/var/lib/postgresql exec setpriv --reuid=999 --regid=999 --clear-groups "$BASH_SOURCE" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
	if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
		cat >&2 <<-'EOM'
		Error: Database is uninitialized and superuser password is not specified.
		       You must specify POSTGRES_PASSWORD to a non-empty value for the
		       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".
		EOM
		exit 1
	fi
	echo "edgefit-test postgres: initializing database in $PGDATA"
	pwfile=$(mktemp)
	printf '%s\n' "${POSTGRES_PASSWORD}" > "$pwfile"
	# shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of words, as upstream
	# As upstream: the socket and loopback stay trust (initdb's default), the line below
	# makes every other address use POSTGRES_HOST_AUTH_METHOD; passwords are stored as SCRAM.
	initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=trust \
		$POSTGRES_INITDB_ARGS
	rm -f "$pwfile"
	printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"

	# Temporary server on the unix socket only, with the caller's -c arguments.
	shift
	temp_opts=$(printf '%q ' "$@" -c listen_addresses= -p "${PGPORT:-5432}")
	export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
	PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -o "$temp_opts" -w -t 60 start
	psql_init=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
	if [ "$POSTGRES_DB" != 'postgres' ]; then
		"${psql_init[@]}" --dbname postgres --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db" ;
		EOSQL
	fi
	for f in /docker-entrypoint-initdb.d/*; do
		[ -e "$f" ] || continue
		case "$f" in
			*.sh)
				if [ -x "$f" ]; then echo "running $f"; "$f"; else echo "sourcing $f"; . "$f"; fi ;;
			*.sql) echo "running $f"; "${psql_init[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
			*.sql.gz) echo "running $f"; gunzip -c "$f" | "${psql_init[@]}" --dbname "$POSTGRES_DB" ;;
			*) echo "ignoring $f" ;;
		esac
	done
	PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -m fast -w -t 60 stop
	unset PGPASSWORD
	set -- postgres "$@"
	echo "edgefit-test postgres: init process complete; ready for start up."
fi

exec "$@"
