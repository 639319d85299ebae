#!/bin/sh
# edgefit TEST image entrypoint for Redis 7.0 (Debian package), after the official redis
# image's: `-opt`/`*.conf` first arguments mean redis-server; started as root, redis-server
# runs as uid 999 (redis) after the files in /data that are not redis's are given to it.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi
if [ "$1" = "redis-server" ]; then
	# The official image compiles protected-mode to "no" (a container's port is reached from
	# other containers). Debian's binary defaults to "yes": say "no" unless the caller chose.
	chose=no
	for arg; do
		case "$arg" in --protected-mode) chose=yes ;; esac
	done
	if [ "$chose" = no ] && [ -n "$2" ] && [ "${2#-}" = "$2" ] && [ -r "$2" ] \
		&& grep -qE '^[[:space:]]*protected-mode[[:space:]]' "$2"; then
		chose=yes
	fi
	if [ "$chose" = no ]; then
		set -- "$@" --protected-mode no
	fi
	if [ "$(id -u)" = "0" ]; then
		find . \! -user redis -exec chown redis '{}' + 2>/dev/null || :
		# setpriv (util-linux) in place of the official image's gosu.
		HOME=/data exec setpriv --reuid=999 --regid=999 --clear-groups "$0" "$@"
	fi
	umask 0077
fi
exec "$@"
