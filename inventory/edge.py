"""Example inventory of production edge hosts: copy it and put your own hosts in.

Each host is (address, data). The data overrides group_data/all.py, where every setting is
documented. Sizes are read from each host's live facts; nothing about memory is set here.

    pyinfra inventory/edge.py deploy.py --dry    # show what would change
    pyinfra inventory/edge.py deploy.py          # deploy
    edgefit verify inventory/edge.py             # check memory budgets afterwards
"""

edge = [
    ("vps-fra-1.example.net", {
        "ssh_key": "~/.ssh/id_ed25519",
        "edgefit_domain": "dify.example.net",
        "edgefit_data_disk": "/dev/sdb",          # a block-storage volume
        "edgefit_data_disk_format": False,        # set True once, for a new empty volume
    }),
    ("vps-ams-2.example.net", {
        "ssh_key": "~/.ssh/id_ed25519",
        "edgefit_without": ["sandbox", "ssrf_proxy"],  # no code nodes on this one
    }),
]
