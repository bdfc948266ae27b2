"""sftpfs.remote.ssh against a real sshd on loopback, plus pure unit tests.

The session ``sftp_server`` forbids TCP forwarding and has one ed25519 host
key; ``server2`` (this module's) allows forwarding and also has an ECDSA host
key, for ProxyJump and host-key-type negotiation.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import io
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from sftpfs.remote import ssh
from sftpfs.remote.ssh import SshError, SshOptions, Target
from tests.server import HOST_ALIAS, SftpServer, free_port

PIPE_SCRIPT = """\
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


# ------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No terminal, no agent, an empty HOME, no secret remembered from before."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setattr(ssh, "_tty_available", lambda: False)
    ssh._STDIN_PASSWORD.reset()
    ssh._TYPED_PASSWORDS.clear()
    ssh._DECRYPTED_KEYS.clear()
    yield home
    ssh._STDIN_PASSWORD.reset()


class ExtraServer(SftpServer):
    """The test sshd plus an ECDSA host key, with TCP forwarding allowed, and
    passwords through keyboard-interactive (PAM) instead of "password"."""

    def _setup_files(self) -> None:
        super()._setup_files()
        self.ecdsa_key = self.etc / "host_ecdsa"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(self.ecdsa_key)],
                       check=True, capture_output=True)

    def _write_configs(self) -> None:
        super()._write_configs()
        text = self.sshd_config.read_text()
        for old, new in (("AllowTcpForwarding no", "AllowTcpForwarding yes"),
                         ("PasswordAuthentication yes", "PasswordAuthentication no"),
                         ("KbdInteractiveAuthentication no", "KbdInteractiveAuthentication yes"),
                         ("UsePAM no", f"UsePAM {'yes' if self.as_root else 'no'}")):
            text = text.replace(old, new)
        self.sshd_config.write_text(text + f"HostKey {self.ecdsa_key}\n")

    def ecdsa_line(self) -> str:
        kind, data = Path(f"{self.ecdsa_key}.pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {kind} {data}\n"


@pytest.fixture(scope="module")
def server2(sftp_server, tmp_path_factory):
    srv = ExtraServer(tmp_path_factory.mktemp("sshd2"))
    # same system user as the session server: keep its password valid
    srv.password = sftp_server.password
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(sftp_server):
    return sftp_server


def alias_opts(srv: SftpServer, config: Path | None = None, **kw) -> SshOptions:
    return SshOptions(host=HOST_ALIAS, config_file=str(config or srv.ssh_config), **kw)


def direct_opts(srv: SftpServer, known_hosts: Path, **kw) -> SshOptions:
    """No config file at all: everything from the "command line"."""
    kw.setdefault("identity_files", [str(srv.client_key)])
    kw.setdefault("batch_mode", True)
    kw.setdefault("port", srv.port)
    return SshOptions(host=srv.host, user=srv.user, config_file=None,
                      known_hosts_files=[str(known_hosts)], **kw)


@contextlib.contextmanager
def connected(opts: SshOptions):
    transport, target = ssh.connect(opts)
    try:
        yield transport, target
    finally:
        transport.close()


def connect_error(opts: SshOptions) -> str:
    with pytest.raises(SshError) as info:
        transport, _ = ssh.connect(opts)
        transport.close()
    message = str(info.value)
    assert "\n" not in message, message
    return message


def other_key_line(tmp_path: Path, name: str, kind: str = "ed25519") -> str:
    path = tmp_path / f"other_{kind}"
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)],
                       check=True, capture_output=True)
    kind_name, data = Path(f"{path}.pub").read_text().split()[:2]
    return f"{name} {kind_name} {data}\n"


def server_name(srv: SftpServer) -> str:
    return f"[{srv.host}]:{srv.port}"


def needs_password(srv: SftpServer) -> None:
    if srv.password is None:
        pytest.skip("password authentication needs the test sshd to run as root")


# ------------------------------------------------------ connecting, host keys
def test_connect_via_config_alias(server, remote_dir):
    with connected(alias_opts(server, server_alive_interval=7)) as (transport, target):
        assert transport.is_authenticated()
        assert transport.packetizer._Packetizer__keepalive_interval == 7
        assert target == Target(hostname=server.host, port=server.port, user=server.user,
                                alias=HOST_ALIAS)
        sftp = transport.open_sftp_client()
        (remote_dir / "hello.txt").write_text("hi")
        assert sftp.listdir(str(remote_dir)) == ["hello.txt"]
        sftp.close()


def test_connect_with_user_at_host_and_no_config(server, tmp_path):
    opts = direct_opts(server, server.known_hosts)
    opts.host, opts.user = f"{server.user}@{server.host}", None
    with connected(opts) as (transport, target):
        assert transport.is_authenticated()
        assert target.user == server.user and target.alias == server.host


def test_unknown_host_key_refused(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    message = connect_error(direct_opts(server, empty))
    assert "unknown" in message
    assert server.host_key_fingerprint() in message  # OpenSSH's own formatting
    assert "StrictHostKeyChecking=accept-new" in message
    assert server_name(server) in message
    assert empty.read_text() == ""


def test_accept_new_records_key_then_strict_passes(server, tmp_path):
    known = tmp_path / "newdir" / "known_hosts"
    with connected(direct_opts(server, known, strict_host_key_checking="accept-new")):
        pass
    assert known.read_text() == server.known_hosts_line()
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    assert stat.S_IMODE(known.parent.stat().st_mode) == 0o700
    with connected(direct_opts(server, known, strict_host_key_checking="yes")):
        pass
    assert known.read_text() == server.known_hosts_line()  # not added twice


def test_accept_new_appends_after_a_line_without_newline(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(other_key_line(tmp_path, "elsewhere.example").rstrip("\n"))
    with connected(direct_opts(server, known, strict_host_key_checking="accept-new")):
        pass
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[1] == server.known_hosts_line().strip()


def test_strict_no_accepts_unknown_key_with_warning(server, tmp_path, caplog):
    known = tmp_path / "known_hosts"
    with caplog.at_level(logging.WARNING, logger="sftpfs.remote.ssh"), \
            connected(direct_opts(server, known, strict_host_key_checking="no")):
        pass
    assert "StrictHostKeyChecking=no" in caplog.text


@pytest.mark.parametrize("strict", ["yes", "accept-new", "no"])
def test_changed_host_key_refused(server, tmp_path, strict):
    known = tmp_path / "known_hosts"
    known.write_text(other_key_line(tmp_path, server_name(server)))
    before = known.read_text()
    message = connect_error(direct_opts(server, known, strict_host_key_checking=strict))
    assert "changed" in message.lower()
    assert server.host_key_fingerprint() in message
    assert f"ssh-keygen -R '{server_name(server)}'" in message
    assert known.read_text() == before


def test_revoked_host_key_refused(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line() + "@revoked * " + server.host_key_pub() + "\n")
    assert "revoked" in connect_error(direct_opts(server, known))


def test_hashed_known_hosts_entry(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")
    with connected(direct_opts(server, known)):
        pass


def test_hash_known_hosts_writes_hashed_line(server, tmp_path):
    known = tmp_path / "known_hosts"
    config = server.make_ssh_config(tmp_path / "config", known_hosts=known, strict="accept-new",
                                    extra=("HashKnownHosts yes",))
    with connected(alias_opts(server, config)):
        pass
    text = known.read_text()
    assert text.startswith("|1|") and server.host not in text
    found = subprocess.run(["ssh-keygen", "-F", server_name(server), "-f", str(known)],
                           capture_output=True, text=True)
    assert found.returncode == 0, "OpenSSH does not find our hashed entry"
    with connected(alias_opts(server, config, strict_host_key_checking="yes")):
        pass


def test_wildcard_known_hosts_entry(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.*]:{server.port} {server.host_key_pub()}\n")
    with connected(direct_opts(server, known)):
        pass


def test_host_key_alias(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"my-alias {server.host_key_pub()}\n")
    with connected(direct_opts(server, known, extra={"HostKeyAlias": "my-alias"})):
        pass


def test_known_key_type_is_negotiated_first(server2, tmp_path):
    """The server has ed25519 (paramiko's favourite) and ECDSA host keys;
    known_hosts knows only the ECDSA one: that one must be asked for."""
    known = tmp_path / "known_hosts"
    known.write_text(server2.ecdsa_line())
    with connected(direct_opts(server2, known)) as (transport, _):
        assert transport.get_remote_server_key().get_name() == "ecdsa-sha2-nistp256"
    known.write_text(server2.known_hosts_line())
    with connected(direct_opts(server2, known)) as (transport, _):
        assert transport.get_remote_server_key().get_name() == "ssh-ed25519"


def test_corrupt_known_hosts_lines_are_skipped(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("garbage\n" f"{server_name(server)} ssh-ed25519 !!!notbase64\n"
                     "@cert-authority * ssh-ed25519 AAAA\n" + server.known_hosts_line())
    with connected(direct_opts(server, known)):
        pass


# ------------------------------------------------------------ authentication
def test_wrong_key_authentication_failed(server, tmp_path):
    other = tmp_path / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, capture_output=True)
    config = server.make_ssh_config(tmp_path / "config", identity=other)
    message = connect_error(alias_opts(server, config))
    assert "authentication failed" in message
    assert f"{server.user}@{server.host}" in message
    assert "publickey" in message


def test_missing_identity_file_authentication_failed(server, tmp_path):
    config = server.make_ssh_config(tmp_path / "config", identity=tmp_path / "nope")
    assert "authentication failed" in connect_error(alias_opts(server, config))


def test_password_from_stdin(server, tmp_path, monkeypatch):
    needs_password(server)
    config = server.make_ssh_config(tmp_path / "config", identity=None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(server.password + "\n"))
    with connected(alias_opts(server, config, password_stdin=True)) as (transport, _):
        assert transport.is_authenticated()
    # read once per process: a second connection (pool, reconnect) reuses it
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with connected(alias_opts(server, config, password_stdin=True)):
        pass


def test_wrong_password_from_stdin(server, tmp_path, monkeypatch, caplog):
    needs_password(server)
    config = server.make_ssh_config(tmp_path / "config", identity=None)
    secret = "wrong-" + server.password
    monkeypatch.setattr(sys, "stdin", io.StringIO(secret + "\n"))
    with caplog.at_level(logging.DEBUG):
        message = connect_error(alias_opts(server, config, password_stdin=True))
    assert "authentication failed" in message and "password" in message
    assert secret not in message and secret not in caplog.text


def test_password_stdin_empty(server, tmp_path, monkeypatch):
    config = server.make_ssh_config(tmp_path / "config", identity=None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    message = connect_error(alias_opts(server, config, password_stdin=True))
    assert "authentication failed" in message and "no password on standard input" in message


def test_password_prompt_on_terminal(server, tmp_path, monkeypatch):
    needs_password(server)
    config = server.make_ssh_config(tmp_path / "config", identity=None, batch=False)
    prompts = []
    answers = iter(["bad-1", server.password])
    monkeypatch.setattr(ssh, "_tty_available", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda p: prompts.append(p) or next(answers))
    with connected(alias_opts(server, config)):
        pass
    assert prompts == [f"{server.user}@{server.host}'s password: "] * 2
    # the pool's next connection does not ask again
    with connected(alias_opts(server, config)):
        pass
    assert len(prompts) == 2


def test_password_prompt_gives_up_after_three_tries(server, tmp_path, monkeypatch):
    needs_password(server)
    config = server.make_ssh_config(tmp_path / "config", identity=None, batch=False)
    prompts = []
    monkeypatch.setattr(ssh, "_tty_available", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda p: prompts.append(p) or "bad")
    assert "authentication failed" in connect_error(alias_opts(server, config))
    assert len(prompts) == 3


def test_batch_mode_never_prompts(server, tmp_path, monkeypatch):
    config = server.make_ssh_config(tmp_path / "config", identity=None, batch=True)
    monkeypatch.setattr(ssh, "_tty_available", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda p: pytest.fail(f"prompted: {p}"))
    message = connect_error(alias_opts(server, config))
    assert "authentication failed" in message and "BatchMode" in message


def test_keyboard_interactive_password_from_stdin(server2, tmp_path, monkeypatch):
    needs_password(server2)
    config = server2.make_ssh_config(tmp_path / "config", identity=None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(server2.password + "\n"))
    with connected(alias_opts(server2, config, password_stdin=True)) as (transport, _):
        assert transport.is_authenticated()
    ssh._STDIN_PASSWORD.reset()
    monkeypatch.setattr(sys, "stdin", io.StringIO("wrong\n"))
    message = connect_error(alias_opts(server2, config, password_stdin=True))
    assert "authentication failed" in message and "keyboard-interactive" in message
    assert "no usable key" in message


def test_keyboard_interactive_on_terminal(server2, tmp_path, monkeypatch):
    needs_password(server2)
    config = server2.make_ssh_config(tmp_path / "config", identity=None, batch=False)
    prompts = []
    monkeypatch.setattr(ssh, "_tty_available", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda p: prompts.append(p) or server2.password)
    with connected(alias_opts(server2, config)):
        pass
    assert len(prompts) == 1 and "password" in prompts[0].lower()


@pytest.fixture
def encrypted_key(server2, tmp_path):
    key = tmp_path / "enc_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-phrase", "-f", str(key)],
                   check=True, capture_output=True)
    original = server2.authorized_keys.read_text()
    server2.authorized_keys.write_text(original + Path(f"{key}.pub").read_text())
    yield key
    server2.authorized_keys.write_text(original)


def test_encrypted_key_asks_passphrase_on_terminal(server2, encrypted_key, tmp_path,
                                                   monkeypatch):
    config = server2.make_ssh_config(tmp_path / "config", identity=encrypted_key, batch=False)
    prompts = []
    answers = iter(["not-it", "s3cret-phrase"])
    monkeypatch.setattr(ssh, "_tty_available", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda p: prompts.append(p) or next(answers))
    with connected(alias_opts(server2, config)):
        pass
    assert prompts == [f"Enter passphrase for key '{encrypted_key}': ",
                       f"Bad passphrase, try again for {encrypted_key}: "]
    with connected(alias_opts(server2, config)):  # decrypted once per process
        pass
    assert len(prompts) == 2


def test_encrypted_key_skipped_without_terminal(server2, encrypted_key, tmp_path, caplog):
    config = server2.make_ssh_config(tmp_path / "config", identity=encrypted_key, batch=False)
    with caplog.at_level(logging.DEBUG, logger="sftpfs.remote.ssh"):
        message = connect_error(alias_opts(server2, config))
    assert "authentication failed" in message
    assert "skipping encrypted identity file" in caplog.text


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A private ssh-agent; returns ssh-add as a function."""
    if not shutil.which("ssh-agent"):
        pytest.skip("ssh-agent not installed")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))

    def add(key: Path) -> None:
        subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True,
                       env={**os.environ, "SSH_AUTH_SOCK": str(sock)})

    yield add
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def test_agent_key(server, tmp_path, agent):
    agent(server.client_key)
    config = server.make_ssh_config(tmp_path / "config", identity=None)
    text = config.read_text().replace("IdentitiesOnly yes", "IdentitiesOnly no")
    config.write_text(text)
    with connected(alias_opts(server, config)) as (transport, _):
        assert transport.is_authenticated()


def test_identities_only_filters_agent_keys(server, tmp_path, agent):
    agent(server.client_key)
    other = tmp_path / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, capture_output=True)
    # agent key = the right key, but IdentitiesOnly names another one
    config = server.make_ssh_config(tmp_path / "config", identity=other)
    assert "authentication failed" in connect_error(alias_opts(server, config))
    # the identity file's public half selects the agent's copy of it
    private = tmp_path / "only_pub"
    Path(f"{private}.pub").write_text(Path(f"{server.client_key}.pub").read_text())
    config = server.make_ssh_config(tmp_path / "config2", identity=private)
    with connected(alias_opts(server, config)):
        pass


# ---------------------------------------------------------- network failures
def test_connection_refused(server, tmp_path):
    port = free_port()
    message = connect_error(direct_opts(server, server.known_hosts, port=port))
    assert message == f"connection to 127.0.0.1 port {port} refused"


def test_silent_listener_times_out(server):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        start = time.monotonic()
        message = connect_error(direct_opts(server, server.known_hosts, port=port,
                                            connect_timeout=1.5))
        elapsed = time.monotonic() - start
    assert message == f"connection to 127.0.0.1 port {port} timed out"
    assert 1.0 <= elapsed < 1.5 + 3


def test_not_an_ssh_server(server):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]

        def answer_http() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer_http, daemon=True).start()
        message = connect_error(direct_opts(server, server.known_hosts, port=port,
                                            connect_timeout=5))
    assert message == f"127.0.0.1 port {port} did not answer as an SSH server"


def test_unresolvable_host(server):
    opts = direct_opts(server, server.known_hosts)
    opts.host = "no-such-host.invalid"
    assert "could not resolve hostname no-such-host.invalid" in connect_error(opts)


# ------------------------------------------------------------------ proxies
def test_proxy_command(server, tmp_path):
    pipe = tmp_path / "pipe.py"
    pipe.write_text(PIPE_SCRIPT)
    config = server.make_ssh_config(
        tmp_path / "config", hostname="127.0.0.1",
        extra=(f"ProxyCommand {sys.executable} {pipe} %h %p",))
    with connected(alias_opts(server, config)) as (transport, _):
        proxy = transport.sock
        assert isinstance(proxy, ssh._ProxyCommand)
        assert transport.open_sftp_client().listdir(str(server.root)) is not None
    assert proxy.proc.poll() is not None, "ProxyCommand left running"


def test_proxy_command_failure(server, tmp_path):
    config = server.make_ssh_config(
        tmp_path / "config", extra=('ProxyCommand sh -c "echo proxy-broke >&2; exit 3"',))
    message = connect_error(alias_opts(server, config, connect_timeout=5))
    assert "ProxyCommand" in message and "proxy-broke" in message and "3" in message


def jump_config(path: Path, target: SftpServer, jump: SftpServer, proxy_jump: str) -> Path:
    known = path.parent / "jump_known_hosts"
    known.write_text(target.known_hosts_line() + jump.known_hosts_line())
    path.write_text(
        f"Host jumphost\n  HostName {jump.host}\n  Port {jump.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.client_key}\n"
        f"Host {HOST_ALIAS}\n  HostName {target.host}\n  Port {target.port}\n"
        f"  User {target.user}\n  IdentityFile {target.client_key}\n"
        f"  ProxyJump {proxy_jump}\n"
        f"Host *\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  BatchMode yes\n")
    return path


def test_proxy_jump(server, server2, tmp_path):
    config = jump_config(tmp_path / "config", server, server2, "jumphost")
    with connected(alias_opts(server, config)) as (transport, target):
        assert target.port == server.port
        assert isinstance(transport.sock, ssh._Carrier)
        assert transport.open_sftp_client().listdir(str(server.root)) is not None
        jump_channel = transport.sock._sock
    assert jump_channel.get_transport().is_active() is False, "jump transport left open"


def test_proxy_jump_chain(server, server2, tmp_path):
    config = jump_config(tmp_path / "config", server, server2, "jumphost,jumphost")
    with connected(alias_opts(server, config)) as (transport, _):
        assert transport.is_authenticated()


def test_proxy_jump_refused_by_forwarding_policy(server, server2, tmp_path):
    # the session server forbids TCP forwarding: it cannot be a jump host
    config = jump_config(tmp_path / "config", target=server2, jump=server, proxy_jump="jumphost")
    message = connect_error(alias_opts(server2, config))
    assert "forbids TCP forwarding" in message


# ------------------------------------------------------- resolve, precedence
CONFIG = """\
Host web
    HostName web.example.com
    Port 2200
    User alice
    IdentityFile ~/.ssh/web_key
    IdentityFile %d/.ssh/%r@%h
    ProxyCommand nc %h %p %r
    ConnectTimeout 7
    ServerAliveInterval 42
    StrictHostKeyChecking accept-new
Host *.example.org
    User bob
Host *
    IdentityFile ~/.ssh/all_key
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config"
    path.write_text(CONFIG)
    return str(path)


def test_resolve_from_config(config_file):
    assert ssh.resolve(SshOptions("web", config_file=config_file)) == Target(
        hostname="web.example.com", port=2200, user="alice", alias="web")


def test_resolve_command_line_wins(config_file):
    opts = SshOptions("web", user="carol", port=2222, config_file=config_file,
                      extra={"HostName": "other.example.com"})
    assert ssh.resolve(opts) == Target("other.example.com", 2222, "carol", "web")
    opts = SshOptions("dave@web", config_file=config_file)
    assert ssh.resolve(opts).user == "dave"


def test_match_exec_works_though_invoke_is_left_out_at_start_up(tmp_path):
    # sftpfs keeps paramiko from importing invoke (80 ms of start-up) until a
    # config has a `Match exec`: a fresh interpreter, as a mount has.
    config = tmp_path / "config"
    config.write_text('Match exec "test 1 = 1"\n    Port 2201\n'
                      'Match exec "false"\n    User nobody-should-see-this\n')
    code = (
        "import sys\n"
        "from sftpfs.remote import ssh\n"
        "import paramiko.config\n"
        "assert 'invoke' not in sys.modules and paramiko.config.invoke is None\n"
        "t = ssh.resolve(ssh.SshOptions('h', user='u', config_file=sys.argv[1]))\n"
        "print(t.port, t.user)\n")
    r = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2201", "u"]


def test_resolve_patterns_and_defaults(config_file):
    assert ssh.resolve(SshOptions("x.example.org", config_file=config_file)) == Target(
        "x.example.org", 22, "bob", "x.example.org")
    assert ssh.resolve(SshOptions("plain", config_file=None)) == Target(
        "plain", 22, getpass.getuser(), "plain")


def test_settings_precedence(config_file, isolated):
    s = ssh._settings(SshOptions("web", port=2222, user="carol", config_file=config_file,
                                 identity_files=["~/cli_key"]))
    home = str(isolated)
    assert [p for p, _ in s.identity_files] == [
        f"{home}/cli_key", f"{home}/.ssh/web_key", f"{home}/.ssh/carol@web.example.com",
        f"{home}/.ssh/all_key"]
    assert s.proxy_command == "nc web.example.com 2222 carol"  # tokens see the command line
    assert (s.timeout, s.alive_interval, s.strict) == (7.0, 42.0, "accept-new")
    assert s.known_hosts[0] == f"{home}/.ssh/known_hosts"
    s = ssh._settings(SshOptions("web", config_file=config_file, connect_timeout=3,
                                 strict_host_key_checking="yes", server_alive_interval=5,
                                 known_hosts_files=["/tmp/kh"],
                                 extra={"ProxyCommand": "none"}))
    assert (s.timeout, s.alive_interval, s.strict) == (3.0, 5.0, "yes")
    assert s.known_hosts == ["/tmp/kh"] and s.proxy_command is None


def test_settings_defaults(isolated):
    s = ssh._settings(SshOptions("plain", config_file=None))
    home = str(isolated)
    assert [p for p, _ in s.identity_files] == [
        f"{home}/.ssh/id_ed25519", f"{home}/.ssh/id_ecdsa", f"{home}/.ssh/id_rsa"]
    assert (s.timeout, s.alive_interval, s.strict, s.batch) == (15.0, 15.0, "yes", False)
    assert s.global_known_hosts[0] == "/etc/ssh/ssh_known_hosts"


def test_missing_default_config_is_fine_but_explicit_one_is_not(tmp_path):
    assert ssh.resolve(SshOptions("h")).hostname == "h"  # HOME is empty
    with pytest.raises(SshError, match="does not exist"):
        ssh.resolve(SshOptions("h", config_file=str(tmp_path / "missing")))


@pytest.mark.parametrize("opts", [
    SshOptions("h", config_file=None, strict_host_key_checking="maybe"),
    SshOptions("h", config_file=None, port=70000),
    SshOptions("h", config_file=None, extra={"Host": "evil"}),
    SshOptions("h", config_file=None, extra={"ProxyCommand": "a\nHost *"}),
    SshOptions("", config_file=None),
])
def test_bad_options(opts):
    with pytest.raises(SshError):
        ssh.resolve(opts)


@pytest.mark.parametrize("spec, expected", [
    ("jump", (None, "jump", None)),
    ("me@jump:2022", ("me", "jump", 2022)),
    ("ssh://me@jump:2022", ("me", "jump", 2022)),
    ("[::1]:2022", (None, "::1", 2022)),
    ("a@b@jump", ("a@b", "jump", None)),
])
def test_parse_jump(spec, expected):
    assert ssh._parse_jump(spec) == expected


# ------------------------------------------------------------ pure helpers
def test_fingerprint_format(tmp_path):
    assert ssh.fingerprint(b"") == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
    key_path = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_path)],
                   check=True, capture_output=True)
    openssh = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key_path}.pub"],
                             check=True, capture_output=True, text=True).stdout.split()[1]
    key = paramiko.PKey.from_path(key_path)
    assert ssh.fingerprint(key) == openssh == ssh.fingerprint(key.asbytes())
    assert "=" not in openssh


def test_host_matches():
    name = "[127.0.0.1]:2222"
    assert ssh._host_matches(name, name)
    assert ssh._host_matches("other,[127.0.0.1]:2222", name)
    assert not ssh._host_matches("1:2222", name)  # brackets are literal, not a char class
    assert ssh._host_matches("[127.0.0.?]:2222", name)
    assert ssh._host_matches("*", name)
    assert not ssh._host_matches("*,![127.0.0.1]:*", name)
    assert ssh._host_matches("HOST.Example.COM", "host.example.com")
    salt = os.urandom(20)
    hashed = paramiko.HostKeys.hash_host(name, "|1|" + base64.b64encode(salt).decode())
    assert ssh._host_matches(hashed, name)
    assert not ssh._host_matches(hashed, "[127.0.0.1]:2223")
    assert not ssh._host_matches("|1|bad|hash", name)


def test_host_key_order():
    available = ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256")
    assert ssh._host_key_order([], available) == list(available)
    assert ssh._host_key_order(["ssh-rsa"], available) == [
        "rsa-sha2-512", "rsa-sha2-256", "ssh-ed25519", "ecdsa-sha2-nistp256"]
    assert ssh._host_key_order(["ecdsa-sha2-nistp256", "ssh-dss"], available) == [
        "ecdsa-sha2-nistp256", "ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]
