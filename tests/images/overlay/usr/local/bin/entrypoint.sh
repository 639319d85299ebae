#!/bin/sh
# edgefit TEST image entrypoint for squid 5.7 (Debian package), after ubuntu/squid's:
# arguments starting with "-" are squid's (default CMD: -f /etc/squid/squid.conf -NYC);
# anything else is run as given (`squid -N -f /etc/squid/squid.conf`, or Dify's own
# ssrf_proxy entrypoint). squid starts as root and drops to cache_effective_user proxy (13).
set -e
if [ "${1#-}" != "$1" ]; then
	set -- /usr/sbin/squid "$@"
fi
install -d -o proxy -g proxy -m 0750 /var/spool/squid /var/log/squid 2>/dev/null || :
exec "$@"
