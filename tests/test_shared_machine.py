"""A shared machine with a hostile second user: offload files stay private and cannot be redirected.

The tests make two real local users (an attacker and a victim) and run the engine as each, with one temp
folder between them, as on a shared server. They need root and `useradd`/`setpriv` (CI runs as root);
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from flexgen_core import Engine, Policy
from flexgen_core.runtime.private_dir import UnsafeFolderError, open_private_folder, user_temp_folder
from flexgen_core.testing import build_checkpoint, sample_prompts

CACHE_ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)


def _can_make_users() -> str | None:
    if os.geteuid() != 0:
        return "making local users needs root (CI runs as root)"
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            return f"this host has no {tool}"
    return None


class User:
    def __init__(self, name: str):
        self.name = name
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.home = Path(tempfile.mkdtemp(prefix=f"home-{name}-"))
        os.chown(self.home, self.uid, self.gid)

    def run(self, code: str, *args: str, tmpdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "TMPDIR": str(tmpdir),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
        return subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                               sys.executable, "-c", textwrap.dedent(code), *args],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd="/")

    def remove(self) -> None:
        subprocess.run(["userdel", self.name], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def users():
    reason = _can_make_users()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    made = []
    try:
        made.append(User(f"fgattack{tag}"))
        made.append(User(f"fgvictim{tag}"))
        yield made
    finally:
        for user in made:
            user.remove()


@pytest.fixture
def shared(users):
    """A temp folder every user may write to (sticky, like /tmp), and a checkpoint both can read."""
    root = Path(tempfile.mkdtemp(prefix="shared-machine-"))
    root.chmod(0o755)
    tmp = root / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    model = root / "model"
    shutil.copytree(build_checkpoint("odd"), model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield tmp, model
    shutil.rmtree(root, ignore_errors=True)


_VICTIM = """
import json, sys
from flexgen_core import Engine, Policy
model, secret_tokens = sys.argv[1], json.loads(sys.argv[2])
policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
try:
    with Engine.from_pretrained(model, policy=policy, device="cpu") as engine:
        folder = str(engine.offload.path)
        out = engine.generate([secret_tokens], max_new_tokens=4)
    print(json.dumps({"ok": [r.completions[0].token_ids for r in out], "folder": folder}))
except ValueError as e:
    print(json.dumps({"refused": str(e)}))
"""


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_an_offload_base_another_user_made_is_refused_and_no_kv_cache_reaches_them(users, shared):
    """The attacker pre-makes the victim's default offload base, open to all: the victim's engine refuses
    it in one line, before writing anything; no file of the victim's appears in the attacker's folder."""
    attacker, victim = users
    tmp, model = shared
    planted = tmp / f"flexgen-offload-{victim.uid}"
    made = attacker.run("import os, sys; os.mkdir(sys.argv[1]); os.chmod(sys.argv[1], 0o777)", str(planted),
                        tmpdir=tmp)
    assert made.returncode == 0, made.stderr
    prompt = sample_prompts(model, 1, 12, 12, seed=1)[0]
    result = _result(victim.run(_VICTIM, str(model), json.dumps(prompt), tmpdir=tmp))
    assert "refused" in result, result
    assert str(planted) in result["refused"] and f"belongs to user {attacker.name!r}" in result["refused"]
    assert list(planted.iterdir()) == []


def test_another_users_offload_base_does_not_stop_a_second_user(users, shared):
    """Whatever the attacker makes of the old shared name and of its own base, the victim runs, and its
    files live in a folder only it can open."""
    attacker, victim = users
    tmp, model = shared
    code = """
    import os, sys
    tmp = sys.argv[1]
    os.mkdir(os.path.join(tmp, "flexgen-offload"), 0o755)
    os.mkdir(os.path.join(tmp, f"flexgen-offload-{os.getuid()}"), 0o700)
    open(os.path.join(tmp, "flexgen-bench"), "w").write("not a folder")
    """
    assert attacker.run(code, str(tmp), tmpdir=tmp).returncode == 0
    prompt = sample_prompts(model, 1, 12, 12, seed=1)[0]
    result = _result(victim.run(_VICTIM, str(model), json.dumps(prompt), tmpdir=tmp))
    assert "ok" in result, result
    folder = Path(result["folder"])
    assert folder.parent == tmp / f"flexgen-offload-{victim.uid}"
    base = folder.parent.stat()
    assert base.st_uid == victim.uid and base.st_mode & 0o777 == 0o700
    # The same prompt on the engine here: the victim's answer is the model's.
    with Engine.from_pretrained(model, policy=CACHE_ON_DISK, device="cpu", offload_dir=tmp / "mine") as engine:
        assert result["ok"] == [r.completions[0].token_ids for r in engine.generate([prompt], max_new_tokens=4)]


_SWAP_WHILE_RUNNING = """
import json, os, sys, threading, time
from flexgen_core import Engine, Policy
model, secret_tokens, offload = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
try:
    engine = Engine.from_pretrained(model, policy=policy, device="cpu", offload_dir=offload)
except ValueError as e:
    print(json.dumps({"refused": str(e)}))
    sys.exit(0)
print(json.dumps({"folder": str(engine.offload.path)}), flush=True)
sys.stdin.readline()  # the attacker acts here
out = engine.generate([secret_tokens], max_new_tokens=4)
engine.close()
print(json.dumps({"ok": [r.completions[0].token_ids for r in out]}), flush=True)
"""


@pytest.mark.parametrize("base_mode", [0o777, 0o755])
def test_a_swapped_engine_folder_redirects_nothing(users, shared, base_mode):
    """The attack of the issue: while the victim's engine runs, the attacker renames its folder and puts
    one of its own there, with a symlink to the victim's private file and a world-writable, hard-linked
    cache file. A base others may write to is refused up front; in the victim's own base the attacker
    cannot act at all; either way the victim's file is untouched and no KV data reaches the attacker."""
    attacker, victim = users
    tmp, model = shared
    base = tmp / f"victim-offload-{base_mode:o}"
    base.mkdir()
    base.chmod(base_mode)
    os.chown(base, victim.uid, victim.gid)
    private = victim.home / "private.txt"
    private.write_text("the victim's own file\n")
    os.chown(private, victim.uid, victim.gid)
    private.chmod(0o600)
    prompt = sample_prompts(model, 1, 12, 12, seed=2)[0]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(victim.home), "TMPDIR": str(tmp),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(["setpriv", f"--reuid={victim.uid}", f"--regid={victim.gid}", "--clear-groups",
                             sys.executable, "-c", _SWAP_WHILE_RUNNING, str(model), json.dumps(prompt), str(base)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/")
    try:
        first = json.loads(proc.stdout.readline() or json.dumps({"error": proc.stderr.read()[-3000:]}))
        if base_mode & 0o002:
            assert "refused" in first and "writable by every user" in first["refused"], first
            return
        assert "folder" in first, first
        attack = """
        import json, os, sys
        folder, private = sys.argv[1], sys.argv[2]
        done = []
        try:
            os.rename(folder, folder + ".moved")
            os.mkdir(folder, 0o777)
            os.symlink(private, os.path.join(folder, "cache-0-0-0-kv.bin"))
            trap = os.path.join(os.path.dirname(folder), "trap.bin")
            open(trap, "wb").close()
            os.chmod(trap, 0o666)
            os.link(trap, os.path.join(folder, "cache-1-0-0-kv.bin"))
            done.append("swapped")
        except OSError as e:
            done.append(f"{type(e).__name__}: {e.strerror}")
        print(json.dumps(done))
        """
        tried = attacker.run(attack, first["folder"], str(private), tmpdir=tmp)
        assert tried.returncode == 0, tried.stderr
        assert json.loads(tried.stdout.splitlines()[-1]) == ["PermissionError: Permission denied"]
        proc.stdin.write("\n")
        proc.stdin.flush()
        second = json.loads(proc.stdout.readline() or json.dumps({"error": proc.stderr.read()[-3000:]}))
        assert "ok" in second, second
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert private.read_text() == "the victim's own file\n"
    assert list(base.iterdir()) == []


def test_files_planted_inside_an_engine_folder_are_never_followed(tmp_path):
    """Defence in depth, one user: a symlink or a file under the name of a cache file the engine is
    about to make is refused (O_EXCL, O_NOFOLLOW), not followed: the linked file is untouched."""
    model = build_checkpoint("odd")
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    prompt = sample_prompts(model, 1, 12, 12, seed=3)[0]
    with Engine.from_pretrained(model, policy=CACHE_ON_DISK, device="cpu", offload_dir=tmp_path / "off") as engine:
        (engine.offload.path / "cache-0-0-0-kv.bin").symlink_to(target)
        with pytest.raises(FileExistsError):
            engine.generate([prompt], max_new_tokens=2)
    assert target.read_text() == "precious\n"


def test_private_folder_checks(tmp_path):
    """The base must be a real folder of this user's that no one else may write: each refusal names the
    folder and the reason in one line."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(UnsafeFolderError, match=r"'.*link' is a symbolic link"):
        open_private_folder(link, "offload_dir")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafeFolderError, match=r"'.*loose' is writable by every user \(mode 0777\)"):
        open_private_folder(loose, "offload_dir")
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(UnsafeFolderError, match=r"'.*file' is not a folder"):
        open_private_folder(plain, "offload_dir")
    fresh = tmp_path / "a" / "fresh"
    os.close(open_private_folder(fresh, "offload_dir"))
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert user_temp_folder("flexgen-offload").name == f"flexgen-offload-{os.geteuid()}"
