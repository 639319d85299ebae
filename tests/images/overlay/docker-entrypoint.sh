#!/bin/sh
# edgefit TEST image entrypoint for nginx (Debian package), after the official nginx image's:
# for `nginx ...` it runs /docker-entrypoint.d/*.sh and renders /etc/nginx/templates/*.template
# into /etc/nginx/conf.d/ with envsubst (only variables that are set), then execs the command.
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
	if [ -d /etc/nginx/templates ]; then
		defined=$(printf '${%s} ' $(env | cut -d= -f1))
		for tpl in /etc/nginx/templates/*.template; do
			[ -f "$tpl" ] || continue
			out="/etc/nginx/conf.d/$(basename "$tpl" .template)"
			echo "$0: rendering $tpl to $out"
			envsubst "$defined" < "$tpl" > "$out"
		done
	fi
	for script in /docker-entrypoint.d/*.sh; do
		[ -x "$script" ] || continue
		echo "$0: running $script"
		"$script"
	done
	echo "$0: ready for start up"
fi
exec "$@"
