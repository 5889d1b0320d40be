"""
Sandbox for untrusted generated Python programs (HumanEval completions, SPEC §8).

Each program runs in a fresh interpreter (`python -I -S -B`: no site-packages, no PYTHON* variables, a
minimal environment without the caller's secrets) in its own session and a private temp working
directory, deleted afterwards. Whatever happens in the program, the caller gets an ExecutionResult.

    from nanochat_ray.evals.sandbox import run_program
    run_program("print(1 + 1)")            # ExecutionResult(status='passed', stdout='2\\n', ...)

HumanEval programs are assembled by nanochat_ray.tasks.humaneval.humaneval_program (the reference's
grader) and run here.

What confines it, set up by this file's child side before the program's first line:

- The kernel, where the host allows it (a probe finds out once per process; what is missing is named
  in one warning, and the rest applies). Started as root, the program runs as a fresh unprivileged
  uid and gid, no supplementary groups, owner of its working directory only: it cannot write or
  delete other users' files, signal their processes or read their /proc/<pid>/environ. It runs in
  its own network namespace (no network) and as init of its own PID namespace, so when it ends, or
  the parent kills its supervisor, the kernel kills every process it created. Without namespaces
  the parent sweeps its session (and, as root, its uid) instead. A seccomp filter makes the kernel
  refuse every socket (EPERM), namespace or not. Limits it cannot raise: memory, CPU seconds, bytes
  per file, open files, processes (none, once unprivileged), core dumps.
- An audit hook (PEP 578), called by the interpreter's C code on every audited operation whatever
  module object a program reaches it through: it refuses exec, fork, spawn, signals, sockets, ctypes,
  subinterpreters, extension modules from outside the interpreter's library, writes outside the
  working directory, more than FILES_LIMIT new files, deleting, renaming or chmod-ing files, and the
  introspection that could reach its own state (gc, frame and code objects, tracing, signal handlers).
- A pass needs proof that the program ran to its end: the parent sends a nonce on stdin, the hook
  keeps it, and writes it to a pipe only when the harness reports, from its own frame, that the last
  line ran. Exiting with status 0 early (os._exit) is a failure.

The parent enforces the wall clock, keeps at most OUTPUT_LIMIT bytes of each output stream and kills
the child's process group at the end. Linux only (elsewhere run_program refuses). This file is also
the child's entry point (`python -I -S -B sandbox.py ...`), so it imports the standard library only,
and what only the parent needs inside its functions: the child starts faster, and never loads
subprocess (whose C helper forks without an audit event).
"""

import contextlib
import functools
import math
import os
import signal
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR

try:
    import resource
except ImportError:  # no way to set the limits: run_program refuses rather than run unconfined
    resource = None

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout and of stderr kept per program
FILE_SIZE_LIMIT = 8 * 2**20  # largest file a program may write, bytes
FILES_LIMIT = 16  # files and directories a program may create: with FILE_SIZE_LIMIT, at most 128 MiB on disk
OPEN_FILES_LIMIT = 64
PROGRAM_FILE = "program.py"  # in the working directory; tracebacks name it
POLL_SECONDS = 0.05  # how often the parent looks whether the child exited while something holds its pipes
EXIT_FAILED, EXIT_MEMORY, EXIT_REFUSED = 1, 3, 4  # the child's exit codes besides 0
CHILD_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8"}  # plus HOME and TMPDIR: the working directory
SANDBOX_IDS = 1 << 30  # uids and gids of sandboxed programs (as root): one fresh id each, far above accounts'
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_NO_NEW_PRIVS = 22, 2, 38
# seccomp: the audit architecture of each 64-bit machine we have a filter for, and the system calls refused
# there: socket and socketpair (all families: no network, and no AF_UNIX path either, which reaches host
# daemons such as Docker's or Ray's whatever the network namespace; nothing a program needs, and the
# audit hook refuses them already), io_uring_setup (io_uring creates sockets without socket()) and
# pidfd_getfd (takes a copy of another process's socket)
AUDIT_ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SOCKET_SYSCALLS = {"x86_64": (41, 53, 425, 438), "aarch64": (198, 199, 425, 438)}
DONE_EVENT = "nanochat.sandbox.done"  # raised by the harness after the program's last line
OVER_EVENT = "nanochat.sandbox.over"  # raised by the harness when the program failed

# operations a program may not do at all (PEP 578 event names)
REFUSED_EVENTS = frozenset({
    "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill",
    "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown",
    "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "shutil.rmtree",
    "os.unshare", "os.setns", "cpython.PyInterpreterState_New",
    "sqlite3.enable_load_extension", "sqlite3.load_extension",
    # what would reach the hook's own frame, cells or function
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
    "sys.settrace", "sys.setprofile", "function.__new__",
})
REFUSED_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})  # frames: the hook's is on a traceback
REFUSED_PREFIXES = ("socket.", "ctypes.")
# C modules that bypass the hook: fork+exec without an event, arbitrary C calls, a new interpreter
# without the hook, signal handlers (Python code that runs inside the hook's frame)
REFUSED_MODULES = ("_posixsubprocess", "_ctypes", "_signal", "_xxsubinterpreters", "_xxinterpchannels", "_test")
OS_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass
class ExecutionResult:
    status: str  # passed | failed | timeout | memory | crashed | refused
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # one line: the exception, the signal, the limit hit, or why it did not run
    duration: float = 0.0  # wall seconds, interpreter start-up included
    truncated: bool = False  # stdout or stderr went past OUTPUT_LIMIT and was cut

    @property
    def success(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """What the kernel lets this process use for its sandboxes (host_isolation finds out)."""
    switch_user: bool  # root, and setresuid works: every program runs as a fresh uid
    namespaces: int  # unshare() flags that work: CLONE_NEWPID | CLONE_NEWNET (| CLONE_NEWUSER when not root)
    seccomp: bool  # the filter that refuses sockets installs and works
    missing: tuple[str, ...] = ()  # what is unavailable and why, for the warning


# --- parent side


@functools.cache
def host_isolation() -> Isolation:
    """Probe once (an interpreter that tries each isolation on itself) and warn once about what is missing."""
    import json, subprocess, warnings  # parent side only, see the module docstring
    probe = subprocess.run([sys.executable, "-I", "-S", "-B", __file__, "--probe"], env=CHILD_ENV,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    try:
        found = json.loads(probe.stdout)
        isolation = Isolation(found["switch_user"], found["namespaces"], found["seccomp"], tuple(found["missing"]))
    except (ValueError, KeyError, TypeError):
        isolation = Isolation(False, 0, False, (f"the isolation probe failed: {probe.stderr.strip()[-300:]}",))
    if isolation.missing:
        warnings.warn("sandbox: running programs without " + "; without ".join(isolation.missing)
                      + ". The audit hook, the limits and the final kill still apply; see the README's security"
                      " section for what the host must allow.", RuntimeWarning, stacklevel=3)
    return isolation


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run `code` as a program in the sandbox; passed means it ran to its last line without raising."""
    if resource is None or not sys.platform.startswith("linux"):
        return ExecutionResult("refused", error="sandbox limits need Linux; not running the program unconfined")
    import subprocess, tempfile  # parent side only, see the module docstring
    isolation = host_isolation()
    start = time.monotonic()
    sandbox_id = SANDBOX_IDS + int.from_bytes(os.urandom(3), "big") if isolation.switch_user else -1
    nonce = os.urandom(16).hex().encode()
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as workdir:
        # "replace": a lone surrogate cannot be valid source anyway, and the caller must not see an exception
        Path(workdir, PROGRAM_FILE).write_bytes(code.encode("utf-8", "replace"))
        if sandbox_id >= 0:
            os.chown(workdir, sandbox_id, sandbox_id)  # mkdtemp made it 0700: private to the program
        done_read, done_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", __file__, repr(timeout), str(memory_mb), str(sandbox_id),
                 str(isolation.namespaces), str(int(isolation.seccomp)), str(done_write)],
                cwd=workdir,
                env={**CHILD_ENV, "HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(done_write,),
                start_new_session=True,  # its own session and process group, so one killpg reaches it all
            )
        except OSError as error:  # e.g. EAGAIN from fork on a loaded host
            os.close(done_read)
            return ExecutionResult("refused", error=f"could not start the interpreter: {error}")
        finally:
            os.close(done_write)
        with process, open(done_read, "rb") as done:
            process.stdin.write(nonce)  # 32 bytes: fits the pipe, never blocks
            process.stdin.close()
            try:
                stdout, stderr, truncated, timed_out = _collect_output(process, timeout)
            finally:
                _kill_group(process.pid)  # before the leader is reaped, so its group id cannot be reused yet
                if not isolation.namespaces & CLONE_NEWPID:
                    _sweep(process.pid, sandbox_id)
            os.set_blocking(done.fileno(), False)
            finished = _read_available(done) == nonce
        returncode = process.returncode
    stdout_text, stderr_text = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    last_line = stderr_text.strip().rsplit("\n", 1)[-1][:200]
    if timed_out or returncode == -signal.SIGXCPU:
        status, error = "timeout", f"wall-clock limit of {timeout:g} s" if timed_out else "CPU-time limit"
    elif returncode == 0 and finished:
        status, error = "passed", ""
    elif returncode == 0:
        status, error = "failed", "exited with status 0 before its last line ran (os._exit?): not a pass"
    elif returncode == EXIT_MEMORY:
        status, error = "memory", f"MemoryError (limit {memory_mb} MB)"
    elif returncode == EXIT_REFUSED:
        status, error = "refused", last_line
    elif returncode < 0:
        status, error = "crashed", f"killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    else:
        status, error = "failed", last_line
    return ExecutionResult(status, stdout_text, stderr_text, error, time.monotonic() - start, truncated)


def _collect_output(process, timeout: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close or the wall clock runs out -> (stdout, stderr, truncated, timed_out)."""
    import selectors  # parent side only, see the module docstring
    deadline = time.monotonic() + timeout
    kept = {process.stdout: bytearray(), process.stderr: bytearray()}
    truncated = False
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(kept[process.stdout]), bytes(kept[process.stderr]), truncated, True
            for key, _ in selector.select(min(remaining, POLL_SECONDS)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                # keep reading past the limit (and drop it), so a chatty program never blocks on a full pipe
                kept_so_far = kept[key.fileobj]
                room = OUTPUT_LIMIT - len(kept_so_far)
                kept_so_far += chunk[:room]
                truncated |= len(chunk) > room
            if _has_exited(process.pid):
                _kill_group(process.pid)  # anything it left behind dies, and with it the last pipe writers
    return bytes(kept[process.stdout]), bytes(kept[process.stderr]), truncated, False


def _read_available(pipe) -> bytes:
    with contextlib.suppress(BlockingIOError):
        return pipe.read(256) or b""
    return b""


def _has_exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, the process group must stay reserved until _kill_group
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
        os.killpg(pid, signal.SIGKILL)


def _sweep(session: int, sandbox_id: int) -> None:
    """Without a PID namespace: kill whatever left the process group, found by its session id or its uid.

    Both only grow by forking, which the program cannot do (audit hook; RLIMIT_NPROC once unprivileged):
    the rounds are for a program that got past both.
    """
    for _ in range(3):
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):  # it ended while we looked
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session
                uid = -1
                if sandbox_id >= 0:
                    status = Path(entry.path, "status").read_text()
                    uid = int(status.split("\nUid:", 1)[1].split()[0])
                if fields[0] != "Z" and (int(fields[3]) == session or uid == sandbox_id >= 0):
                    found.append(int(entry.name))
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- child side: runs in the sandboxed interpreter


def _child_main(timeout: float, memory_mb: int, sandbox_id: int, namespaces: int, seccomp: bool, done_fd: int) -> None:
    exit_now = os._exit  # the program's own exit and flush are not to be trusted
    nonce = sys.stdin.buffer.read(64)  # the parent closed the pipe after writing it
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    source = Path(PROGRAM_FILE).read_bytes()
    try:
        supervisor = os.getpid()
        if namespaces:
            _unshare(namespaces)
            if os.fork():
                _supervise()  # never returns
            # pid 1 of the new namespace from here: its end, for whatever reason, ends all it started
        _apply_limits(timeout, memory_mb)
        if sandbox_id >= 0:
            _switch_user(sandbox_id)
        if namespaces:  # dying with the supervisor (the parent kills its group); the uid switch reset this
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() == 0 and not Path(f"/proc/{supervisor}").exists():
                exit_now(EXIT_REFUSED)  # it died before prctl: nobody would kill us
        if seccomp:  # always, not only without a network namespace: see SOCKET_SYSCALLS for what that adds
            _refuse_syscalls(SOCKET_SYSCALLS[os.uname().machine])
    except (OSError, ValueError) as error:
        print(f"sandbox: could not isolate the program, not running it: {error}", file=sys.stderr, flush=True)
        exit_now(EXIT_REFUSED)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too large a file: an OSError in the program, not a kill
    audit = sys.audit
    _install_audit_hook(os.getcwd(), done_fd, nonce)
    del nonce
    program = types.ModuleType("__main__")  # the program's own __main__, not this file
    program.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = program
    exit_code = 0
    try:
        exec(compile(source, PROGRAM_FILE, "exec"), program.__dict__)
    except BaseException as error:  # SystemExit too: a program that exits early never reached its checks
        exit_code = EXIT_MEMORY if isinstance(error, MemoryError) else EXIT_FAILED
        with contextlib.suppress(BaseException):
            audit(OVER_EVENT)  # the hook forgets the nonce: the traceback below may run program code
        with contextlib.suppress(BaseException):  # a broken exception or stderr must not change the verdict
            # tb_next: leave this file's frame out of the program's traceback
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # os._exit skips the interpreter's own flush
    if exit_code == 0:
        with contextlib.suppress(BaseException):
            audit(DONE_EVENT)
    exit_now(exit_code)  # skips atexit handlers and finalizers, which are program code too


def _supervise() -> None:
    """The namespace's parent: wait for its init (the program) and exit as it did."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: die by the same one, so the parent reads the same returncode
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def _libc():
    import ctypes  # imported on demand: only for unshare and prctl, both before the program runs
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc().unshare(flags) != 0:
        import ctypes
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare: {os.strerror(errno)}")


def _refuse_syscalls(numbers: tuple[int, ...]) -> None:
    """Install a seccomp filter on this process and all it starts: the system calls `numbers` fail with EPERM.

    Any call made with another architecture's convention (i386's int 0x80 on x86_64, arm32 on aarch64) or
    x32's numbering (0x40000000 and up) fails too: the same socket call has other numbers there, and
    this interpreter never uses them. Raises OSError when the kernel refuses the filter.
    """
    import ctypes  # before the audit hook, like unshare and prctl
    arch = AUDIT_ARCHES[os.uname().machine] if sys.maxsize > 2**32 else None
    if arch is None:
        raise OSError(0, "seccomp: no filter for a 32-bit interpreter")

    class Instruction(ctypes.Structure):  # struct sock_filter
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    load_word, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|K, ..JGE|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    # struct seccomp_data: int nr at offset 0, u32 arch at 4; a jump skips jt / jf instructions forward
    checks = [(load_word, 0, 0, 4), (jump_eq, 1, 0, arch), (ret, 0, 0, eperm), (load_word, 0, 0, 0)]
    refused = (0x40000000,) + tuple(numbers)  # 0x40000000: "at least", x32; the rest: "equal"
    for i, number in enumerate(refused):
        to_refusal = len(refused) - i  # past the remaining checks and the allow
        checks.append((jump_ge if i == 0 else jump_eq, to_refusal, 0, number))
    checks += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    instructions = (Instruction * len(checks))(*checks)
    program = Program(len(checks), instructions)
    libc = _libc()
    if (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0  # required to install a filter without CAP_SYS_ADMIN
            or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0):
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp: {os.strerror(errno)}")


def _switch_user(sandbox_id: int) -> None:
    """Become the fresh unprivileged user; keep the interpreter's library importable."""
    # It may sit under a directory only root can enter (/root/.pyenv): directory descriptors opened
    # now, as root, keep it reachable through /proc/self/fd after the switch.
    moved = {}
    for entry in sys.path:
        with contextlib.suppress(OSError):
            moved[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"
    sys.path[:] = [moved.get(entry, entry) for entry in sys.path]
    for module in list(sys.modules.values()):  # imported packages find their submodules through __path__
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for i, path in enumerate(paths):
                old = max((old for old in moved if path == old or path.startswith(old + "/")), key=len, default=None)
                if old is not None:
                    paths[i] = moved[old] + path[len(old):]
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setresgid(sandbox_id, sandbox_id, sandbox_id)
    os.setresuid(sandbox_id, sandbox_id, sandbox_id)


def _apply_limits(timeout: float, memory_mb: int) -> None:
    cpu_seconds = math.ceil(timeout) + 1
    limits = {  # (soft, hard); hard = soft, so the program cannot raise them again
        resource.RLIMIT_AS: (memory_mb * 2**20, memory_mb * 2**20),
        # the parent's wall clock normally comes first; this still bounds the program if the parent dies.
        # SIGXCPU at the soft limit, SIGKILL a second later for a program that ignores it
        resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds + 1),
        resource.RLIMIT_FSIZE: (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        resource.RLIMIT_NOFILE: (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
        resource.RLIMIT_NPROC: (0, 0),  # no new processes or threads (the kernel exempts root: hence the switch)
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:  # already tighter: keep it, raising would fail
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))


def _install_audit_hook(workdir: str, done_fd: int, nonce: bytes) -> None:
    """Install the hook that refuses what the program may not do (see the module docstring).

    The program can rebind any module attribute or builtin, so the hook looks nothing up when it runs:
    everything it uses is bound in its closure here, it never calls anything that could run program
    code (only exact str / bytes / int arguments are inspected), and the introspection that would
    reach its frame, cells or function is refused.
    """
    root = os.path.realpath(workdir)
    inside_root = root + "/"
    library = tuple(entry.rstrip("/") + "/" for entry in sys.path if entry.startswith("/"))
    getcwd, stat, write, getframe, is_dir = os.getcwd, os.stat, os.write, sys._getframe, S_ISDIR
    refused_events, refused_attributes = REFUSED_EVENTS, REFUSED_ATTRIBUTES
    refused_prefixes, refused_modules = REFUSED_PREFIXES, REFUSED_MODULES
    write_flags, files_limit = OS_WRITE_FLAGS, FILES_LIMIT
    done_event, over_event = DONE_EVENT, OVER_EVENT
    denied, type_, str_, bytes_, int_ = PermissionError, type, str, bytes, int
    harness = getframe(1)  # _child_main's frame: the only one whose done / over events count
    state = {"nonce": nonce, "created": 0}

    def resolve(path):
        """An absolute, normalized str path, or None when it is not a plain str / bytes."""
        if type_(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif type_(path) is not str_:
            return None  # a path-like object could answer differently to us and to the kernel
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):  # symlinks cannot exist inside: os.symlink is refused
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def check_create(path, what):
        resolved = resolve(path)
        if resolved is None:
            raise denied(f"sandbox: {what} needs a str path")
        if resolved != root and not resolved.startswith(inside_root):
            raise denied(f"sandbox: {what} outside the working directory is refused: {resolved}")
        try:
            stat(resolved)
        except OSError:  # a new file
            if state["created"] >= files_limit:
                raise denied(f"sandbox: more than {files_limit} new files is refused") from None
            state["created"] += 1

    def hook(event, args):
        if event in refused_events or event.startswith(refused_prefixes):
            raise denied(f"sandbox: {event} is refused")
        if event == "open":
            path, mode, flags = args
            if type_(path) is int_:
                return  # an open descriptor: checked when it was opened
            if (type_(flags) is int_ and flags & write_flags) or (type_(mode) is str_ and any(c in mode for c in "wax+")):
                check_create(path, "writing a file")
            elif mode is None:  # os.open: a directory descriptor would let dir_fd writes go anywhere
                resolved = resolve(path)
                try:
                    directory = resolved is None or is_dir(stat(resolved).st_mode)
                except OSError:
                    directory = False
                if directory:
                    raise denied("sandbox: os.open of a directory is refused")
        elif event == "os.mkdir":
            if args[2] is not None:
                raise denied("sandbox: os.mkdir with dir_fd is refused")
            check_create(args[0], "creating a directory")
        elif event == "sqlite3.connect":
            check_create(args[0], "a database file")
        elif event == "import":
            name, filename = args[0], args[1]
            if type_(name) is str_ and name.startswith(refused_modules):
                raise denied(f"sandbox: importing {name} is refused")
            if filename is not None and not (type_(filename) is str_ and filename.startswith(library)):
                raise denied(f"sandbox: loading extension modules from outside the interpreter's library is refused")
        elif event == "object.__getattr__":
            if args[1] in refused_attributes and state["nonce"] is not None:
                raise denied(f"sandbox: reading .{args[1]} is refused")
        elif event == done_event or event == over_event:
            if getframe(1) is not harness or state["nonce"] is None:
                raise denied(f"sandbox: {event} is the harness's")
            if event == done_event:
                write(done_fd, state["nonce"])
            state["nonce"] = None

    sys.addaudithook(hook)
    # Signal handlers are Python code that can run in the middle of the hook, and sys._getframe(1)
    # there is the hook's frame. The C function is gone from both modules; re-importing _signal is refused.
    def no_handlers(*args, **kwargs):
        raise PermissionError("sandbox: signal handlers are refused")
    signal.signal = sys.modules["_signal"].signal = no_handlers


def _probe() -> None:
    """Try each isolation on this throwaway interpreter; print what works as JSON (host_isolation reads it)."""
    import json
    root = os.geteuid() == 0
    found = {"switch_user": False, "namespaces": 0, "seccomp": False, "missing": []}
    flags = CLONE_NEWPID | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    try:
        _unshare(flags)
        found["namespaces"] = flags
    except OSError as error:
        found["missing"].append(f"PID and network namespaces ({error.strerror}; leftovers are swept instead)")
    if root:
        try:
            _switch_user(SANDBOX_IDS)
            found["switch_user"] = True
        except OSError as error:
            found["missing"].append(f"an unprivileged user (setresuid: {error.strerror}; the program runs as root)")
    try:  # last: it refuses this interpreter's sockets too, which is what it checks
        _refuse_syscalls(SOCKET_SYSCALLS[os.uname().machine])
    except (OSError, KeyError) as error:
        reason = error.strerror if isinstance(error, OSError) else f"no filter for machine {error}"
        found["missing"].append(f"the seccomp filter that refuses sockets ({reason}; only the audit hook"
                                f"{' and the network namespace' if found['namespaces'] else ''} stop them)")
    else:
        import socket
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()
            found["missing"].append("the seccomp filter that refuses sockets (it installed, yet socket() worked)")
        except PermissionError:
            found["seccomp"] = True
    print(json.dumps(found))


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        _probe()
    else:
        _child_main(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1",
                    int(sys.argv[6]))
