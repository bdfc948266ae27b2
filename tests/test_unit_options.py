"""Command-line and -o parsing."""

import pytest

from sftpfs.options import OptionError, build_config, parse_source


@pytest.mark.parametrize(("src", "want"), [
    ("host:", (None, "host", "")),
    ("u@h:/srv/data", ("u", "h", "/srv/data")),
    ("u@h:/x@y:z", ("u", "h", "/x@y:z")),
    ("me@corp.example@h:p", ("me@corp.example", "h", "p")),
    ("[::1]:/a", (None, "::1", "/a")),
])
def test_parse_source(src, want):
    assert parse_source(src) == want


@pytest.mark.parametrize("bad", ["host", "", "u@:/x", "[::1/x"])
def test_parse_source_rejects(bad):
    with pytest.raises(OptionError):
        parse_source(bad)


def test_options_map_to_config():
    cfg = build_config("u@h:/p", "/mnt", port=2222, identities=["k1"], options=[
        "ro,allow_other,uid=1000,gid=100,umask=022", "IdentityFile=k2,StrictHostKeyChecking=accept-new",
        "UserKnownHostsFile=/kh,ConnectTimeout=3,ProxyJump=bastion,attr_timeout=1.5,_netdev,noauto",
    ])
    assert cfg.readonly and cfg.allow_other
    assert (cfg.uid, cfg.gid, cfg.umask) == (1000, 100, 0o22)
    assert cfg.ssh.port == 2222 and cfg.ssh.user == "u"
    assert cfg.ssh.identity_files == ["k1", "k2"]
    assert cfg.ssh.strict_host_key_checking == "accept-new"
    assert cfg.ssh.known_hosts_files == ["/kh"]
    assert cfg.ssh.connect_timeout == 3
    assert cfg.ssh.extra == {"ProxyJump": "bastion"}
    assert cfg.attr_timeout == 1.5
    assert {"ro", "allow_other", "subtype=sftpfs", "fsname=u@h:/p"} <= cfg.fuse_options()


def test_cache_no_zeroes_every_timeout():
    cfg = build_config("h:", "/m", options=["cache=no"])
    assert (cfg.attr_timeout, cfg.entry_timeout, cfg.negative_timeout, cfg.cache_timeout) == (0, 0, 0, 0)


@pytest.mark.parametrize("opt", ["bogus", "uid=x", "cache=maybe", "attr_timeout=-1",
                                 "StrictHostKeyChecking=perhaps"])
def test_bad_options_are_errors(opt):
    with pytest.raises(OptionError):
        build_config("h:", "/m", options=[opt])


def test_mountpoint_checked_before_connecting(monkeypatch, tmp_path):
    """The daemon starts the SSH handshake early (while it imports the rest), but
    never before the mount point is known to be good: a typo must not cost a
    password prompt or a connect time-out."""
    from sftpfs import cli
    from sftpfs.remote import handshake

    started = []
    monkeypatch.setattr(handshake, "Handshake", lambda *a: started.append(a))
    failed = []

    class Notify(cli._Notify):
        def failed(self, message: str) -> None:
            failed.append(message)

    cfg = build_config("user@host:/x", str(tmp_path / "no-such-mountpoint"))
    assert cli._run(cfg, Notify()) == 1
    assert started == [], "the handshake started although the mount point is missing"
    assert len(failed) == 1 and "does not exist" in failed[0]
