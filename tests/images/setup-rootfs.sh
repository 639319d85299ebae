#!/bin/bash
# Runs INSIDE the debootstrap'd rootfs (chroot) after tests/images/overlay/ was copied in.
# Makes the one shared rootfs honour each upstream image's user ids and paths, then trims it.
# Every image gets this same rootfs as its only layer; they differ only in their config
# (Entrypoint, Cmd, Env, User, WorkingDir), written by build.py.
set -euo pipefail
export LC_ALL=C

# --- user ids of the upstream images ------------------------------------------------------
# Files owned by a renumbered id follow it (usermod only fixes the home directory).
move_uid() { # name new_uid
	local old; old=$(id -u "$1")
	[ "$old" = "$2" ] && return 0
	usermod -o -u "$2" "$1"
	find / -xdev -path /proc -prune -o -user "$old" -exec chown -h "$2" '{}' +
}
move_gid() { # name new_gid
	local old; old=$(getent group "$1" | cut -d: -f3)
	[ "$old" = "$2" ] && return 0
	groupmod -o -g "$2" "$1"
	find / -xdev -path /proc -prune -o -group "$old" -exec chgrp -h "$2" '{}' +
}
# nginx's uid/gid 101 must be free; Debian gave gid 101 to crontab (cron came in as a
# dependency of postgresql-common) and uid 101 to postgres.
if getent group crontab >/dev/null; then move_gid crontab 990; fi
# official postgres (Debian) image: postgres 999:999. official redis (Debian) image: redis
# 999:999 as well. One rootfs holds both, so uid/gid 999 is shared (postgres listed first,
# so `id 999` names postgres). Only numbers reach the host's bind mounts.
move_uid postgres 999; move_gid postgres 999
move_uid redis 999;    move_gid redis 999
for f in /etc/passwd /etc/group; do  # redis after postgres, so getpwuid(999) is postgres
	awk -F: '$1=="redis"{r = r $0 "\n"; next} {print} END{printf "%s", r}' "$f" > "$f.new"
	cat "$f.new" > "$f"; rm -f "$f.new"
done
# edoburu/pgbouncer (Alpine) runs as its postgres user, uid/gid 70; "postgres" is taken here.
groupadd -g 70 pgbouncer
useradd -u 70 -g 70 -d /var/run/pgbouncer -s /usr/sbin/nologin -M pgbouncer
# official nginx image: nginx 101:101 (Dify's nginx.conf says `user nginx;`).
groupadd -g 101 nginx
useradd -u 101 -g 101 -d /nonexistent -s /usr/sbin/nologin -M nginx
# Dify's api and web images run as uid 1001 (Dify's init_permissions chowns storage to 1001).
groupadd -g 1001 dify
useradd -u 1001 -g 1001 -d /app -s /bin/bash -M dify

# --- postgres -----------------------------------------------------------------------------
# No Debian cluster: the entrypoint runs initdb in $PGDATA like the official image.
rm -rf /etc/postgresql/15 /var/lib/postgresql/15
sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /etc/postgresql
chown 999:999 /var/lib/postgresql /var/lib/postgresql/data
chmod 00700 /var/lib/postgresql/data
install -d -o 999 -g 999 -m 03775 /var/run/postgresql
# JIT needs libLLVM (~130 MB with bitcode); without llvmjit.so Postgres just reports JIT
# unavailable, which is what edgefit's small hosts want anyway (jit = off).
rm -f /usr/lib/postgresql/15/lib/llvmjit*.so /usr/lib/x86_64-linux-gnu/libLLVM-14.so*
rm -rf /usr/lib/postgresql/15/lib/bitcode
# As the official image: a cluster made by initdb listens on every address (its sample says so);
# Debian's sample keeps localhost, which other containers cannot reach.
sed -ri "s!^#?(listen_addresses)\s*=\s*\S+.*!\1 = '*'!" /usr/share/postgresql/15/postgresql.conf.sample
grep -q "^listen_addresses = '\*'" /usr/share/postgresql/15/postgresql.conf.sample
cp /usr/share/postgresql/15/postgresql.conf.sample /usr/share/postgresql/postgresql.conf.sample

# --- pgbouncer ------------------------------------------------------------------------------
# edoburu/pgbouncer: /usr/bin/pgbouncer, /etc/pgbouncer and /var/run/pgbouncer owned by its user.
ln -sf /usr/sbin/pgbouncer /usr/bin/pgbouncer
rm -f /etc/pgbouncer/pgbouncer.ini /etc/pgbouncer/userlist.txt
chown -R 70:70 /etc/pgbouncer
install -d -o 70 -g 70 -m 0755 /var/run/pgbouncer /var/log/pgbouncer

# --- redis ----------------------------------------------------------------------------------
install -d -o 999 -g 999 -m 0755 /data
install -d -m 0755 /usr/local/etc/redis
ln -sf /usr/bin/redis-server /usr/local/bin/redis-server
ln -sf /usr/bin/redis-cli /usr/local/bin/redis-cli

# --- nginx ----------------------------------------------------------------------------------
# Layout of the official image: conf.d/default.conf, html in /usr/share/nginx/html, logs to
# the container's stdout/stderr. Debian's sites-enabled is not read by the official layout.
rm -rf /etc/nginx/sites-enabled /etc/nginx/sites-available /var/www/html
mkdir -p /var/cache/nginx /etc/nginx/templates
ln -sf /dev/stdout /var/log/nginx/access.log
ln -sf /dev/stderr /var/log/nginx/error.log

# --- squid ----------------------------------------------------------------------------------
install -d -o proxy -g proxy -m 0750 /var/spool/squid /var/log/squid

# --- dify stand-ins -------------------------------------------------------------------------
install -d -o 1001 -g 1001 -m 0755 /app /app/api /app/api/storage
mkdir -p /opt/edgefit/python
python3 -m py_compile /opt/dify-standin/dify_standin.py

# --- trim -----------------------------------------------------------------------------------
# A snakeoil key generated at build time would be one private key shared by every copy.
rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/lintian/* /usr/share/locale/*
find /var/log -type f -delete
rm -f /etc/machine-id /var/lib/dbus/machine-id
: > /etc/hostname
