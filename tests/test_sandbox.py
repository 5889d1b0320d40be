"""Sandbox tests: HumanEval's canonical solutions pass, and hostile or broken programs fail without harm.

    .venv/bin/pytest tests/test_sandbox.py -q
"""

import functools
import os
import socket
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat_ray.evals import sandbox
from nanochat_ray.evals.sandbox import OUTPUT_LIMIT, run_program
from nanochat_ray.tasks import HumanEval, humaneval_program

DATA_ROOT = Path(os.environ.get("NANOCHAT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HUMANEVAL = DATA_ROOT / "humaneval" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    """HumanEval's conversations, the assistant's answer the canonical solution (prompt + body)."""
    if not HUMANEVAL.is_file():
        pytest.fail(f"no HumanEval at {HUMANEVAL}: set NANOCHAT_DATA to a copy of shared/data")
    return list(HumanEval(DATA_ROOT))


def answer(conversation: dict) -> str:
    return conversation["messages"][1]["content"]


def processes_in_group(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (read from /proc, no psutil)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


# --- correct programs


def test_humaneval_canonical_solutions_pass(problems):
    assert len(problems) == 164
    # a few at a time: each run is mostly interpreter start-up, and the box has 2 busy cores
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_program(humaneval_program(c, answer(c))), problems))
    failed = {p["task_id"]: (r.status, r.error) for p, r in zip(problems, results) if not r.success}
    assert not failed


def test_wrong_humaneval_solution_fails(problems):
    conversation = next(c for c in problems if c["task_id"] == "HumanEval/0")  # has_close_elements
    wrong = conversation["messages"][0]["content"] + "    return False\n"  # the whole function, a wrong body
    result = run_program(humaneval_program(conversation, wrong))
    assert result.status == "failed" and "AssertionError" in result.error


def test_output_and_working_directory():
    result = run_program("import os\nprint('hello')\nopen('notes.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.success and result.status == "passed"
    hello, workdir = result.stdout.split()
    assert hello == "hello" and not Path(workdir).exists()  # its temp directory is deleted afterwards


def test_minimal_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    result = run_program("import os\nprint(sorted(os.environ))")
    assert result.success and "SECRET_TOKEN" not in result.stdout


def test_limits_are_set():
    result = run_program("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS))", memory_mb=300)
    assert result.success and result.stdout.strip() == str((300 * 2**20, 300 * 2**20))


# --- broken programs fail, never raise in the caller


@pytest.mark.parametrize("code", [
    "raise ValueError('boom')",
    "import sys\nsys.exit(0)",  # exiting before the checks must not count as passing
    "raise SystemExit",
    "import os\nos._exit(0)",
    "def broken(:",
    "def f(): return f()\nf()",
])
def test_errors_and_early_exits_fail(code):
    result = run_program(code)
    assert result.status == "failed" and not result.success and result.error


def test_infinite_loop_times_out_quickly():
    result = run_program("while True:\n    pass", timeout=1.0)
    assert result.status == "timeout"
    assert result.duration < 4.0


def test_segfault_is_a_crash():
    # a real fault: the program is init of its PID namespace, which ignores signals it sends itself
    result = run_program("import faulthandler\nfaulthandler._read_null()")
    assert result.status == "crashed" and "11" in result.error


@pytest.mark.parametrize("code", [
    "x = bytearray(10**10)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
])
def test_huge_allocations_hit_the_memory_limit(code):
    result = run_program(code, timeout=10.0)
    assert result.status == "memory" and not result.success


def test_output_is_capped():
    result = run_program("print('x' * 10**6)")
    assert result.success and result.truncated and len(result.stdout) == OUTPUT_LIMIT
    chatty = run_program("while True:\n    print('y' * 1000)", timeout=1.0)
    assert chatty.status == "timeout" and len(chatty.stdout) <= OUTPUT_LIMIT


# --- escape attempts are refused and leave nothing behind


@pytest.mark.parametrize("bomb", [
    "while True:\n    os.fork()",
    "import subprocess\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
    "import subprocess\nsubprocess.run('sleep 60 &', shell=True)",
    "os.system('sleep 60 &')",
    "while True:\n    multiprocessing.Process(target=time.sleep, args=(60,)).start()",
    "multiprocessing.set_start_method('spawn')\nwhile True:\n    multiprocessing.Process(target=time.sleep, args=(60,)).start()",
])
def test_fork_bombs_are_contained(bomb):
    code = "import multiprocessing, os, sys, time\n" + bomb
    result = run_program(code, timeout=5.0)
    assert result.status == "failed" and "PermissionError" in result.error


def test_leftover_descendants_are_killed():
    """The kernel-level backstop for a program that gets past the guard: its whole process group dies
    once it exits, even while a descendant still holds its output pipes."""
    process = subprocess.Popen(["sh", "-c", "sleep 60 & echo started"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    with process:
        start = time.monotonic()
        stdout, _, _, timed_out = sandbox._collect_output(process, timeout=20.0)
        assert stdout == b"started\n" and not timed_out and time.monotonic() - start < 5.0
        # SIGKILL is delivered asynchronously: give the kernel a moment to take the group down
        deadline = time.monotonic() + 2.0
        while processes_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_in_group(process.pid) == []


@pytest.mark.parametrize("write", [
    "open(TARGET, 'w').write('x')",
    "open(TARGET, 'a').write('x')",
    "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "import os\nos.mkdir(TARGET)",
    "import os\nos.chdir('/')\nopen(os.path.relpath(TARGET), 'w')",
    "import shutil\nshutil.copy(__file__, TARGET)",
    "import io\nio.FileIO(TARGET, 'w')",
])
def test_writing_outside_is_refused(tmp_path, write):
    # world-writable, so only the sandbox stands between a root-run program and the file
    target = tmp_path / "outside.txt"
    tmp_path.chmod(0o777)
    result = run_program(f"TARGET = {str(target)!r}\n" + write)
    assert result.status == "failed" and "PermissionError" in result.error
    assert not target.exists()


@pytest.mark.parametrize("delete", [
    "import os\nos.remove(TARGET)",
    "import os\nos.unlink(TARGET)",
    "import pathlib\npathlib.Path(TARGET).unlink()",
    "import os\nos.rename(TARGET, TARGET + '.moved')",
    "import os\nos.chmod(TARGET, 0)",
    "import os\nos.utime(TARGET, (0, 0))",
    "import shutil\nshutil.rmtree(os.path.dirname(TARGET))",
    "import shutil\nshutil.move(TARGET, 'here.txt')",
])
def test_changing_files_outside_is_refused(tmp_path, delete):
    target = tmp_path / "keep.txt"
    target.write_text("precious")
    result = run_program(f"import os\nTARGET = {str(target)!r}\n" + delete)
    assert result.status == "failed" and "PermissionError" in result.error
    stat = target.stat()
    assert target.read_text() == "precious" and stat.st_mode & 0o777 == 0o644 and stat.st_mtime > 0


@pytest.mark.parametrize("connect", [
    "socket.socket()",
    "socket.create_connection(('127.0.0.1', PORT), timeout=1)",
    "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)",
    "a, b = socket.socketpair()",
    "import ssl\nssl.create_default_context().wrap_socket(socket.socket(), server_hostname='x')",
])
def test_sockets_are_refused(connect):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = run_program(f"import socket\nPORT = {port}\n" + connect)
        # the hook (urllib wraps its error in a URLError), or first the kernel: socketpair makes its sockets
        # before the audit event, and the seccomp filter refuses that
        assert result.status == "failed" and ("sandbox:" in result.error or "[Errno 1]" in result.error)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


def test_ctypes_is_blocked():
    result = run_program("import ctypes\nctypes.string_at(0)")
    assert result.status == "failed" and "ctypes" in result.error


def test_refuses_without_resource_limits(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "resource", None)
    marker = tmp_path / "ran"
    result = run_program(f"open({str(marker)!r}, 'w')")
    assert result.status == "refused" and not marker.exists()


# --- attacks that get past any Python-level guard (issue 17): each must fail and leave the host as it was

# the original functions come back by re-importing a C module after deleting it from sys.modules
REIMPORT = "import sys\nfor name in ('posix', '_socket', '_io', 'ctypes', '_ctypes'):\n    sys.modules.pop(name, None)\n"


def test_reimported_posix_cannot_run_shell_commands(tmp_path):
    tmp_path.chmod(0o777)
    target = tmp_path / "pwned"
    result = run_program(REIMPORT + f"import posix\nposix.system('touch {target}')")
    assert result.status == "failed" and "sandbox" in result.error and not target.exists()


def test_reimported_posix_cannot_write_or_delete(tmp_path):
    tmp_path.chmod(0o777)
    keep, new = tmp_path / "keep.txt", tmp_path / "new.txt"
    keep.write_text("precious")
    for attack in (f"import posix\nposix.remove({str(keep)!r})",
                   f"import posix\nposix.close(posix.open({str(new)!r}, posix.O_WRONLY | posix.O_CREAT))",
                   f"import _io\n_io.FileIO({str(new)!r}, 'w')"):
        result = run_program(REIMPORT + attack)
        assert result.status == "failed" and "sandbox" in result.error, attack
    assert keep.read_text() == "precious" and not new.exists()


def test_original_open_from_a_guards_closure_cannot_write(tmp_path):
    tmp_path.chmod(0o777)
    target = tmp_path / "pwned"
    attack = ("import builtins\nopener = builtins.open\n"
              "for cell in getattr(builtins.open, '__closure__', None) or ():\n"
              "    if getattr(cell.cell_contents, '__name__', '') == 'open':\n"
              "        opener = cell.cell_contents\n"
              f"opener({str(target)!r}, 'w').write('x')")
    result = run_program(attack)
    assert result.status == "failed" and "sandbox" in result.error and not target.exists()


def test_reimported_socket_cannot_connect():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = run_program(REIMPORT + f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))")
        assert result.status == "failed" and "sandbox" in result.error
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


def test_reimported_ctypes_is_refused():
    result = run_program(REIMPORT + "import ctypes\nprint(ctypes.CDLL(None).getpid())")
    assert result.status == "failed" and "ctypes" in result.error and not result.stdout


def test_reimported_posix_cannot_kill():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        result = run_program(REIMPORT + f"import posix\nposix.kill({victim.pid}, 9)")
        assert result.status == "failed" and "sandbox" in result.error
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_forked_child_that_leaves_the_session_is_killed():
    attack = REIMPORT + ("import posix, time\npid = posix.fork()\nif pid == 0:\n"
                         "    posix.setsid()\n    print(posix.getpid(), flush=True)\n    time.sleep(30)\n"
                         "time.sleep(0.5)")
    result = run_program(attack, timeout=3.0)
    assert result.status == "failed" and "sandbox" in result.error
    for pid in result.stdout.split():  # a child that got out must be dead by now
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_parent_environment_is_not_readable():
    # the test process stands for the evaluator whose environment may hold secrets
    result = run_program(f"print(open('/proc/{os.getpid()}/environ', 'rb').read()[:20])")
    assert result.status == "failed" and "Permission" in result.error and not result.stdout


@pytest.mark.parametrize("code", [
    REIMPORT + "import posix\nposix._exit(0)",
    "import os\nos.abort = None\nimport sys\nsys.modules.pop('posix')\nimport posix\nposix._exit(0)\nassert False",
])
def test_exiting_with_status_0_before_the_checks_is_not_a_pass(code):
    result = run_program(code)
    assert result.status == "failed" and "before" in result.error


# --- the kernel-level isolation, where the host allows it (host_isolation says what it allows)

isolation = sandbox.host_isolation()


@pytest.mark.skipif(not isolation.switch_user, reason="not root, or setresuid refused: runs as the invoking user")
def test_runs_as_a_fresh_unprivileged_user():
    result = run_program("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.stat('.').st_uid)")
    uid, gid, groups, owner = result.stdout.split(maxsplit=3)
    assert result.success and int(uid) >= sandbox.SANDBOX_IDS and gid == uid and groups.startswith("[]")
    assert owner.strip() == uid  # its private working directory is its own


@pytest.mark.skipif(not isolation.namespaces, reason="no PID and network namespaces on this host")
def test_own_pid_and_network_namespaces():
    result = run_program("import os\nprint(os.getpid())\nprint(open('/proc/self/net/dev').read())")
    pid, interfaces = result.stdout.split("\n", 1)
    assert result.success and pid == "1"  # init of its namespace: its end kills all it started
    assert [line.split(":")[0].strip() for line in interfaces.strip().splitlines()[2:]] == ["lo"]


def test_files_and_bytes_written_are_capped():
    many = run_program(f"for i in range({sandbox.FILES_LIMIT + 1}):\n    open(f'f{{i}}', 'w').close()")
    assert many.status == "failed" and f"more than {sandbox.FILES_LIMIT} new files" in many.error
    large = run_program(f"with open('big', 'wb') as f:\n    f.write(bytes({sandbox.FILE_SIZE_LIMIT + 1}))")
    assert large.status == "failed" and "File too large" in large.error


@pytest.mark.parametrize("code", [
    # native code of its own: an extension module written into the working directory
    "import shutil, importlib.machinery as m, importlib.util as u\nshutil.copy(u.find_spec('cmath').origin, 'x.so')\n"
    "spec = u.spec_from_file_location('cmath', 'x.so', loader=m.ExtensionFileLoader('cmath', 'x.so'))\n"
    "spec.loader.create_module(spec)",
    "import _xxsubinterpreters",  # a new interpreter would not have the hook
    "import gc\ngc.get_objects()",  # the way to the hook's function and cells
    "try:\n    open('/etc/passwd', 'a')\nexcept PermissionError as e:\n    e.__traceback__.tb_frame",  # to its frame
    "import signal\nsignal.signal(signal.SIGALRM, print)",  # handlers run inside the hook's frame
])
def test_ways_around_the_hook_are_refused(code):
    result = run_program(code)
    assert result.status == "failed" and "sandbox" in result.error


def test_without_namespaces_or_user_switch_the_attacks_still_fail(monkeypatch, tmp_path):
    """The degraded mode (an unprivileged CI, a container that refuses unshare): hook, limits and sweep."""
    monkeypatch.setattr(sandbox, "host_isolation", lambda: sandbox.Isolation(False, 0, False, ("test",)))
    tmp_path.chmod(0o777)
    target = tmp_path / "pwned"
    for attack in (f"import posix\nposix.system('touch {target}')", f"open({str(target)!r}, 'w')",
                   "import _socket\n_socket.socket()", "import ctypes"):
        result = run_program(REIMPORT + attack)
        assert result.status == "failed" and "sandbox" in result.error, attack
    assert not target.exists()
    assert run_program(REIMPORT + "import posix\nposix._exit(0)").status == "failed"
    assert run_program("print(1)").success


def test_without_network_namespace_the_kernel_refuses_sockets(monkeypatch, tmp_path):
    """No network namespace, and (test only) no audit hook: the child runs through a wrapper whose
    sys.addaudithook does nothing, so only the seccomp filter stands between the program and a socket."""
    wrapper = tmp_path / "no_hook.py"
    wrapper.write_text("import runpy, sys\nsys.addaudithook = lambda hook: None\n"
                       f"runpy.run_path({sandbox.__file__!r}, run_name='__main__')\n")
    monkeypatch.setattr(sandbox, "__file__", str(wrapper))
    attack = REIMPORT + ("import _socket\nfor make in (lambda: _socket.socket(_socket.AF_INET), lambda: _socket.socket("
                         "_socket.AF_INET6), lambda: _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW), lambda: "
                         "_socket.socket(_socket.AF_UNIX), _socket.socketpair):\n"
                         "    try:\n        make()\n        print('created')\n"
                         "    except OSError as error:\n        print(error.errno)")
    for seccomp, expected in ((False, "created"), (True, "1")):  # without the filter: proof the hook is gone
        monkeypatch.setattr(sandbox, "host_isolation", lambda seccomp=seccomp: sandbox.Isolation(False, 0, seccomp, ()))
        result = run_program(attack)
        assert result.stdout.split() == [expected] * 5, (seccomp, result)


def test_unavailable_isolation_is_named_once(monkeypatch):
    """Degraded for real: the probe runs under a filter (test only) refusing unshare and prctl, so neither the
    namespaces nor the seccomp filter can be set up; programs still run, and one warning names both."""
    refused = {"x86_64": (272, 157), "aarch64": (97, 167)}.get(os.uname().machine)  # unshare, prctl
    if refused is None:
        pytest.skip("no seccomp filter for this machine")
    import ctypes  # noqa: F401  imported before the fork that runs the filter's installer
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: real_run(
        *args, preexec_fn=lambda: sandbox._refuse_syscalls(refused), **kwargs))
    monkeypatch.setattr(sandbox, "host_isolation", functools.cache(sandbox.host_isolation.__wrapped__))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = run_program("print(1)"), run_program("import _socket\n_socket.socket()")
    assert first.success and second.status == "failed" and "sandbox" in second.error
    messages = [str(warning.message) for warning in caught if warning.category is RuntimeWarning]
    assert len(messages) == 1, messages
    assert "without PID and network namespaces (unshare: Operation not permitted" in messages[0]
    assert "without the seccomp filter that refuses sockets (seccomp: Operation not permitted" in messages[0]
