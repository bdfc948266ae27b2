"""A real OpenSSH sshd on loopback, for a user confined to SFTP.

    with SftpServer(tmp_path).start() as srv:
        subprocess.run(["sftp", "-F", str(srv.ssh_config), "sftpfs-test"], ...)

As root, a dedicated unprivileged user (``sftpfs-test``) is created once, with
a random password; the exported directory belongs to it, so permission errors
from the server are real (root would bypass them).  Without root, sshd runs as
the current user and only key authentication works (``password`` is None).

Server-side state (host key, sshd_config, log, authorized_keys, exported tree)
lives in a fresh 0755 directory under /tmp, so the unprivileged user can
traverse it whatever the mode of ``workdir`` (pytest's tmp_path is 0700).
Client-side files (client key, known_hosts, ssh_config) live in ``workdir``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TEST_USER = "sftpfs-test"
HOST_ALIAS = "sftpfs-test"


class ServerError(RuntimeError):
    """sshd could not be set up or did not come up."""


def is_root() -> bool:
    return os.geteuid() == 0


def sshd_path() -> str | None:
    """Path of the sshd binary, or None when OpenSSH server is not installed."""
    if os.access(SSHD, os.X_OK):
        return SSHD
    return shutil.which("sshd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        raise ServerError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr}{e.stdout}") from e


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid (children first found, grandchildren after)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) comes after the ")" that closes the command name
        try:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount(fields[1]) == target:
                return True
    return False


def _unescape_mount(s: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1 : i + 4]) == 3 and set(s[i + 1 : i + 4]) <= set("01234567"):
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


PASSWORD_FILE = Path("/var/lib/sftpfs-test/password")


def _shared_password() -> str:
    """The test user's password: random, made once per machine and kept in a
    root-only file, so that servers started concurrently (several test runs,
    benchmarks) do not change it under each other."""
    PASSWORD_FILE.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not PASSWORD_FILE.exists():
        tmp = PASSWORD_FILE.with_name(f"password.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("pw-" + secrets.token_hex(16) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, PASSWORD_FILE)  # atomic: the first one wins
        tmp.unlink()
    return PASSWORD_FILE.read_text().strip()


class SftpServer:
    """Real OpenSSH sshd on 127.0.0.1 for a user confined to SFTP (ForceCommand internal-sftp)."""

    host: str
    port: int
    user: str
    password: str | None
    root: Path
    client_key: Path
    known_hosts: Path
    ssh_config: Path

    def __init__(self, workdir: Path, force_command: str = "internal-sftp"):
        """`force_command`: what every session runs instead (a host that allows
        SSH logins but not SFTP, e.g. git-shell, is "/bin/false" here)."""
        self.force_command = force_command
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.as_root = is_root()
        if self.as_root:
            self.user = TEST_USER
            self.password = _shared_password()
        else:
            self.user = pwd.getpwuid(os.getuid()).pw_name
            self.password = None  # sshd cannot check passwords when not root
        self.proc: subprocess.Popen | None = None
        self.base = Path(tempfile.mkdtemp(prefix="sftpfs-test-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.etc = self.base / "etc"
        self.root = self.base / "root"
        self.sshd_config = self.etc / "sshd_config"
        self.host_key = self.etc / "host_ed25519"
        self.authorized_keys = self.etc / "authorized_keys"
        self.pidfile = self.etc / "sshd.pid"
        self.log = self.etc / "sshd.log"
        self.client_key = self.workdir / "client_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self._small_mounts: list[Path] = []
        self._stopped = False
        self.uid = self.gid = -1

    # ------------------------------------------------------------------ setup
    def _ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.user)
            exists = True
        except KeyError:
            exists = False
        if not exists:
            r = subprocess.run(
                ["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", self.user],
                capture_output=True,
                text=True,
            )
            # a concurrent run may have created it meanwhile (exit 9: already exists)
            if r.returncode not in (0, 9):
                raise ServerError(f"useradd {self.user} failed: {r.stderr}")
        _run(["chpasswd"], input=f"{self.user}:{self.password}\n")
        # no expiry / lock surprises
        subprocess.run(["usermod", "-U", self.user], capture_output=True)

    def _setup_files(self) -> None:
        self.etc.mkdir(mode=0o755)
        self.root.mkdir(mode=0o755)
        pw = pwd.getpwnam(self.user)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        os.chown(self.root, self.uid, self.gid)
        os.chmod(self.root, 0o755)

        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sftpfs-test-host",
              "-f", str(self.host_key)])
        if self.client_key.exists():
            self.client_key.unlink()
            Path(str(self.client_key) + ".pub").unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sftpfs-test-client",
              "-f", str(self.client_key)])
        os.chmod(self.client_key, 0o600)
        pub = Path(str(self.client_key) + ".pub").read_text()
        self.authorized_keys.write_text(pub)
        os.chmod(self.authorized_keys, 0o644)

    def host_key_pub(self) -> str:
        """The host public key as "ssh-ed25519 AAAA..." (without comment)."""
        parts = Path(str(self.host_key) + ".pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def host_key_fingerprint(self) -> str:
        """SHA256:... fingerprint of the host key, as ssh prints it."""
        out = _run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(self.host_key) + ".pub"]).stdout
        return out.split()[1]

    def known_hosts_line(self, port: int | None = None) -> str:
        port = self.port if port is None else port
        hostpat = self.host if port == 22 else f"[{self.host}]:{port}"
        return f"{hostpat} {self.host_key_pub()}\n"

    def _write_configs(self) -> None:
        self.sshd_config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.pidfile}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    f"PasswordAuthentication {'yes' if self.as_root else 'no'}",
                    "KbdInteractiveAuthentication no",
                    "PermitEmptyPasswords no",
                    "UsePAM no",
                    "PermitRootLogin no",
                    f"AllowUsers {self.user}",
                    "UseDNS no",
                    "MaxAuthTries 10",
                    "MaxSessions 100",
                    "MaxStartups 100:30:200",
                    "LoginGraceTime 60",
                    "ClientAliveInterval 0",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "AllowAgentForwarding no",
                    "PermitTTY no",
                    "PrintMotd no",
                    "Subsystem sftp internal-sftp",
                    f"ForceCommand {self.force_command}",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        self.known_hosts.write_text(self.known_hosts_line())
        self.ssh_config.write_text(
            "\n".join(
                [
                    f"Host {HOST_ALIAS}",
                    f"    HostName {self.host}",
                    f"    Port {self.port}",
                    f"    User {self.user}",
                    f"    IdentityFile {self.client_key}",
                    "    IdentitiesOnly yes",
                    f"    UserKnownHostsFile {self.known_hosts}",
                    "    StrictHostKeyChecking yes",
                    "    BatchMode yes",
                    "",
                ]
            )
        )

    def make_ssh_config(
        self,
        path: Path | str,
        *,
        alias: str = HOST_ALIAS,
        hostname: str | None = None,
        port: int | None = None,
        user: str | None = None,
        identity: Path | str | None = "default",
        known_hosts: Path | str | None = "default",
        strict: str | None = "yes",
        batch: bool = True,
        extra: tuple[str, ...] = (),
    ) -> Path:
        """Write a variant of ``ssh_config`` (e.g. another known_hosts, no key,
        another port).  A None value leaves that keyword out."""
        lines = [f"Host {alias}", f"    HostName {hostname or self.host}",
                 f"    Port {port or self.port}", f"    User {user or self.user}"]
        if identity == "default":
            identity = self.client_key
        if identity is not None:
            lines += [f"    IdentityFile {identity}"]
        lines += ["    IdentitiesOnly yes"]
        if known_hosts == "default":
            known_hosts = self.known_hosts
        if known_hosts is not None:
            lines += [f"    UserKnownHostsFile {known_hosts}"]
        if strict is not None:
            lines += [f"    StrictHostKeyChecking {strict}"]
        if batch:
            lines += ["    BatchMode yes"]
        lines += [f"    {x}" for x in extra]
        path = Path(path)
        path.write_text("\n".join(lines) + "\n")
        return path

    # -------------------------------------------------------------- lifecycle
    def start(self) -> SftpServer:
        sshd = sshd_path()
        if not sshd:
            raise ServerError("sshd not found (install openssh-server)")
        if self.as_root:
            self._ensure_user()
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._setup_files()
        last_err = ""
        for _attempt in range(5):
            self.port = free_port()
            self._write_configs()
            self.log.write_text("")
            self.proc = subprocess.Popen(
                [sshd, "-D", "-f", str(self.sshd_config), "-E", str(self.log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            atexit.register(self.stop)
            ok, last_err = self._wait_banner(timeout=15)
            if ok:
                self._stopped = False
                return self
            self._kill()
            if "Address already in use" not in last_err:
                break
        self.stop()
        raise ServerError(f"sshd did not start: {last_err}")

    def _wait_banner(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                return False, f"exited with {self.proc.returncode}: {err}{self.read_log()}"
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    s.settimeout(5)
                    data = s.recv(256)
                    if data.startswith(b"SSH-2.0-"):
                        return True, ""
            except OSError:
                pass
            time.sleep(0.05)
        return False, f"no SSH banner within {timeout}s: {self.read_log()}"

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # sshd -D forks a process per connection (and a privsep child per
        # session); those outlive the listener, so kill them by pid as well.
        pids = _descendants(proc.pid) if proc.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def kill_sessions(self) -> int:
        """Kill the per-connection sshd processes (drops every client connection);
        the listener keeps running.  Returns how many processes were killed."""
        if self.proc is None or self.proc.poll() is not None:
            return 0
        pids = _descendants(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    @contextlib.contextmanager
    def down(self):
        """No server for the block (connections refused), then sshd again on its port."""
        self._kill()
        try:
            yield
        finally:
            self.proc = subprocess.Popen(
                [sshd_path(), "-D", "-f", str(self.sshd_config), "-E", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)
            ok, err = self._wait_banner(timeout=15)
            if not ok:
                raise ServerError(f"sshd did not restart: {err}")

    @contextlib.contextmanager
    def paused(self):
        """Freeze the per-connection sshd processes (SIGSTOP) for the block: requests
        sent meanwhile wait, as on a stalled link, and are answered afterwards."""
        pids = _descendants(self.proc.pid) if self.proc is not None else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._kill()
        for mnt in reversed(self._small_mounts):
            if _is_mountpoint(mnt):
                r = subprocess.run(["umount", str(mnt)], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        self._small_mounts.clear()
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        self._remove_base()

    def _remove_base(self) -> None:
        # never recurse into something still mounted (a FUSE mount or a tmpfs)
        base = os.path.realpath(self.base)
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and _unescape_mount(fields[1]).startswith(base + "/"):
                    return
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> SftpServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers
    def url(self, sub: str = "") -> str:
        """Remote spec "user@127.0.0.1:/abs/root/sub"."""
        path = str(self.root / sub) if sub else str(self.root)
        return f"{self.user}@{self.host}:{path}"

    def chown(self, path: Path | str, recursive: bool = True) -> None:
        """Give a server-side path (made by the test as root) to the SFTP user."""
        if not self.as_root:
            return
        path = Path(path)
        os.lchown(path, self.uid, self.gid)
        if recursive and path.is_dir() and not path.is_symlink():
            for dirpath, dirnames, filenames in os.walk(path):
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), self.uid, self.gid)

    def mkdir(self, sub: str, mode: int = 0o755) -> Path:
        """Create root/sub (and parents) on the server, owned by the SFTP user."""
        p = self.root / sub
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        cur = p
        while cur != self.root:
            if self.as_root:
                os.chown(cur, self.uid, self.gid)
            cur = cur.parent
        return p

    def make_small_fs(self, sub: str, size: str = "1m") -> Path:
        """Mount a size-limited tmpfs at root/sub, owned by the SFTP user, for
        disk-full tests.  Unmounted at stop().  Needs root: the caller should
        skip the test when ``server.as_root`` is false (pytest.skip is raised
        here when pytest is importable)."""
        if not self.as_root:
            try:
                import pytest
            except ImportError:  # pragma: no cover
                raise ServerError("a small file system needs root") from None
            pytest.skip("mounting a small tmpfs needs root")
        p = self.mkdir(sub)
        _run(
            ["mount", "-t", "tmpfs", "-o",
             f"size={size},mode=0755,uid={self.uid},gid={self.gid}",
             "sftpfs-test-full", str(p)]
        )
        self._small_mounts.append(p)
        return p

    def unmount_small_fs(self, p: Path) -> None:
        if p in self._small_mounts:
            if _is_mountpoint(p) and subprocess.run(["umount", str(p)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)
            self._small_mounts.remove(p)


if __name__ == "__main__":  # manual check: python tests/server.py
    import sys

    wd = Path(tempfile.mkdtemp(prefix="sftpfs-srv-"))
    with SftpServer(wd) as srv:
        print(f"sshd on port {srv.port}, user {srv.user}, password {srv.password}")
        print(f"root {srv.root}\nssh_config {srv.ssh_config}")
        print("try: sftp -F", srv.ssh_config, HOST_ALIAS, "(Ctrl-C to stop)")
        try:
            signal.pause() if sys.stdin.isatty() else time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
        except KeyboardInterrupt:
            pass
    shutil.rmtree(wd, ignore_errors=True)
