"""
Sandbox for untrusted generated Python programs (HumanEval completions, SPEC §8).

Each program runs in a fresh interpreter (`python -I -S -B`: no site-packages, no PYTHON* variables,
a minimal environment) in its own process group and its own temp working directory, deleted
afterwards. Before the program's first line the child sets kernel limits it cannot raise again:
address space (memory), CPU seconds, file size, open files, processes, no core dumps. Then a
Python-level guard (the "reliability guard" idea) disables what a buggy or hostile program could use
to harm the host: creating processes, signalling, leaving its process group, deleting, renaming or
chmod-ing files anywhere, writing files outside its working directory, sockets, ctypes. The parent
enforces the wall-clock limit, keeps at most OUTPUT_LIMIT bytes of each output stream, and kills the
whole process group at the end. Whatever happens in the program, the caller gets an ExecutionResult.

    from nanochat_ray.evals.sandbox import check_humaneval, run_program
    run_program("print(1 + 1)")            # ExecutionResult(status='passed', stdout='2\\n', ...)
    check_humaneval(problem, completion)   # problem: a HumanEval row

Best effort, by nature: Python cannot confine Python. A determined program can dig the original
functions out (gc, frames, __subclasses__) or load an extension module by path. What holds regardless
is kernel-enforced: the limits, the separate process group killed at the end, the wall clock. For
file-system and network isolation that does not depend on the guard, run the evaluator as an
unprivileged user (as root, the kernel exempts the process cap and the guard is the only file barrier).

Linux only (elsewhere run_program refuses). This file is also the child's entry point
(`python -I -S -B sandbox.py TIMEOUT MEMORY_MB`), so it imports the standard library only.
"""

import builtins
import contextlib
import io
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

try:
    import resource
except ImportError:  # no way to set the limits: run_program refuses rather than run unconfined
    resource = None

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout and of stderr kept per program
FILE_SIZE_LIMIT = 16 * 2**20  # largest file a program may write, bytes
OPEN_FILES_LIMIT = 64
PROGRAM_FILE = "program.py"  # in the working directory; tracebacks name it
POLL_SECONDS = 0.05  # how often the parent looks whether the child exited while something holds its pipes
EXIT_FAILED, EXIT_MEMORY, EXIT_REFUSED = 1, 3, 4  # the child's exit codes besides 0 (passed)

# Primitives a program may not call at all; os's Python-level wrappers (execl*, spawn*, popen,
# removedirs, renames, makedirs) go through these. Patched in os and in posix (which os re-exports).
DISABLED_OS_FUNCTIONS = (
    # new processes and programs
    "fork", "forkpty", "system", "posix_spawn", "posix_spawnp", "execv", "execve",
    # leaving the process group (the final kill must reach everything), signalling others,
    # exiting with status 0 before the checks ran
    "setsid", "setpgid", "setpgrp", "kill", "killpg", "_exit",
    # changing files anywhere, even in the working directory (nothing we evaluate needs it)
    "remove", "unlink", "rmdir", "rename", "replace", "truncate", "link", "symlink", "mkfifo", "mknod",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "utime", "setxattr", "removexattr",
    # identity and namespaces
    "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "unshare", "setns",
)
BLOCKED_MODULES = ("ctypes", "_ctypes")  # arbitrary C calls: no guard survives them
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


# --- parent side


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run `code` as a program in the sandbox; passed means it ran to the end without raising."""
    if resource is None or not sys.platform.startswith("linux"):
        return ExecutionResult("refused", error="sandbox limits need Linux; not running the program unconfined")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as workdir:
        # "replace": a lone surrogate cannot be valid source anyway, and the caller must not see an exception
        Path(workdir, PROGRAM_FILE).write_bytes(code.encode("utf-8", "replace"))
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", __file__, repr(timeout), str(memory_mb)],
                cwd=workdir,
                env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # its own process group, so one killpg reaches every descendant
            )
        except OSError as error:  # e.g. EAGAIN from fork on a loaded host
            return ExecutionResult("refused", error=f"could not start the interpreter: {error}")
        with process:
            try:
                stdout, stderr, truncated, timed_out = _collect_output(process, timeout)
            finally:
                _kill_group(process.pid)  # before the leader is reaped, so its group id cannot be reused yet
        returncode = process.returncode
    stdout_text, stderr_text = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    last_line = stderr_text.strip().rsplit("\n", 1)[-1][:200]
    if timed_out or returncode == -signal.SIGXCPU:
        status, error = "timeout", f"wall-clock limit of {timeout:g} s" if timed_out else "CPU-time limit"
    elif returncode == 0:
        status, error = "passed", ""
    elif returncode == EXIT_MEMORY:
        status, error = "memory", f"MemoryError (limit {memory_mb} MB)"
    elif returncode == EXIT_REFUSED:
        status, error = "refused", last_line
    elif returncode < 0:
        status, error = "crashed", f"killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    else:
        status, error = "failed", last_line
    return ExecutionResult(status, stdout_text, stderr_text, error, time.monotonic() - start, truncated)


def check_humaneval(problem: dict, completion: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run a HumanEval completion against its tests; passed means check(entry_point) raised nothing."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    return run_program(program, timeout=timeout, memory_mb=memory_mb)


def _collect_output(process: subprocess.Popen, timeout: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close or the wall clock runs out -> (stdout, stderr, truncated, timed_out)."""
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


def _has_exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, the process group must stay reserved until _kill_group
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
        os.killpg(pid, signal.SIGKILL)


# --- child side: runs in the sandboxed interpreter


def _child_main(timeout: float, memory_mb: int) -> None:
    exit_now = os._exit  # kept before the guard takes it away from the program
    source = Path(PROGRAM_FILE).read_bytes()
    try:
        _apply_limits(timeout, memory_mb)
    except (OSError, ValueError) as error:
        print(f"sandbox: could not apply the limits, not running the program: {error}", file=sys.stderr, flush=True)
        exit_now(EXIT_REFUSED)
    _install_guard(os.getcwd())
    program = types.ModuleType("__main__")  # the program's own __main__, not this file
    program.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = program
    exit_code = 0
    try:
        exec(compile(source, PROGRAM_FILE, "exec"), program.__dict__)
    except BaseException as error:  # SystemExit too: a program that exits early never reached its checks
        exit_code = EXIT_MEMORY if isinstance(error, MemoryError) else EXIT_FAILED
        with contextlib.suppress(BaseException):  # a broken exception or stderr must not change the verdict
            # tb_next: leave this file's frame out of the program's traceback
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # os._exit skips the interpreter's own flush
    exit_now(exit_code)  # skips atexit handlers and finalizers, which are program code too


def _apply_limits(timeout: float, memory_mb: int) -> None:
    cpu_seconds = math.ceil(timeout) + 1
    limits = {  # (soft, hard); hard = soft, so the program cannot raise them again
        resource.RLIMIT_AS: (memory_mb * 2**20, memory_mb * 2**20),
        # the parent's wall clock normally comes first; this still bounds the program if the parent dies.
        # SIGXCPU at the soft limit, SIGKILL a second later for a program that ignores it
        resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds + 1),
        resource.RLIMIT_FSIZE: (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        resource.RLIMIT_NOFILE: (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
        resource.RLIMIT_NPROC: (0, 0),  # no new processes or threads (the kernel exempts root: hence the guard)
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:  # already tighter: keep it, raising would fail
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))


def _install_guard(workdir: str) -> None:
    """Disable what a program could use to harm the host or escape the limits (best effort, see the docstring)."""
    import _io
    import _posixsubprocess
    import _socket
    import posix

    def refuse(name: str):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refused

    root = os.path.realpath(workdir)

    def check_write(path, dir_fd=None) -> None:
        if isinstance(path, int):  # an open descriptor: checked when it was opened
            return
        # realpath follows symlinks, so a link inside the working directory cannot lead out of it
        resolved = os.path.realpath(os.fsdecode(os.fspath(path)))
        if dir_fd is not None or (resolved != root and not resolved.startswith(root + os.sep)):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {resolved}")

    io_open, os_open, os_mkdir = io.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            check_write(file)
        return io_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & OS_WRITE_FLAGS:
            check_write(path, dir_fd)
        return os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        check_write(path, dir_fd)
        return os_mkdir(path, mode, dir_fd=dir_fd)

    class GuardedFileIO(_io.FileIO):  # the raw file class, which opens paths without going through open()
        def __init__(self, file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+"):
                check_write(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open  # pathlib, tempfile, shutil open files through these
    io.FileIO = _io.FileIO = GuardedFileIO
    for module in (os, posix):
        module.open, module.mkdir = guarded_os_open, guarded_mkdir
        for name in DISABLED_OS_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))
    # the choke points of subprocess (run, call, check_output, Popen all end in _execute_child) and of
    # multiprocessing's spawn / forkserver start methods; subprocess also keeps its own fork_exec reference
    subprocess.Popen._execute_child = refuse("subprocess")
    _posixsubprocess.fork_exec = subprocess._fork_exec = refuse("_posixsubprocess.fork_exec")
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal = refuse("signal.pidfd_send_signal")

    class RefusedSocket(socket.socket):  # still a class, so modules that subclass it (ssl, ...) import fine
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: sockets are disabled (no network)")

    # create_connection, create_server, fromfd and socketpair all construct socket.socket
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = RefusedSocket
    _socket.socketpair = refuse("socket.socketpair")
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # `import ctypes` now raises ImportError


if __name__ == "__main__":
    _child_main(timeout=float(sys.argv[1]), memory_mb=int(sys.argv[2]))
