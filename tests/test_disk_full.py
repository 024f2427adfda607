"""A save that meets a full disk says so (the path, errno ENOSPC) and leaves the previous
checkpoint as it was. The disk is really full: a 2 MiB tmpfs in a private mount namespace
(`unshare`), or /dev/full where that is not allowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

import crosschip
from crosschip.errors import CheckpointError

FILL_THEN_SAVE = textwrap.dedent("""
    import sys
    import crosschip
    root = sys.argv[1]
    model = crosschip.from_pretrained(sys.argv[2])
    model.save_pretrained(root + "/ck")
    before = {p: open(root + "/ck/" + p, "rb").read() for p in ("config.json", "model.safetensors")}
    with open(root + "/filler", "wb") as filler:  # every byte left on the disk
        try:
            while True:
                filler.write(bytes(1 << 16))
                filler.flush()
        except OSError:
            pass
    try:
        model.save_pretrained(root + "/ck")
    except crosschip.CrosschipError as exc:
        print(exc)
    after = {p: open(root + "/ck/" + p, "rb").read() for p in before}
    print("unchanged" if after == before else "CHANGED")
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from helpers import save_hf_llama

    path = tmp_path_factory.mktemp("disk-full") / "src"
    save_hf_llama(path)
    return path


def test_full_disk_names_the_path_and_errno(source, tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run([unshare, "-rm", "sh", "-c", f'mount -t tmpfs -o size=2m none "$1" && exec "$2" -c "$3" '
                             f'"$1" "$4"', "sh", str(mount), sys.executable, FILL_THEN_SAVE, str(source)],
                            capture_output=True, text=True, timeout=120)
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    message, verdict = result.stdout.strip().splitlines()[-2:]
    assert message == (f"cannot write a checkpoint to {mount}/ck: the disk is full (errno ENOSPC: No space left "
                       "on device); free some space and save again; the previous checkpoint there is unchanged")
    assert verdict == "unchanged"


def test_enospc_from_any_file_of_the_save_says_the_disk_is_full(source, tmp_path):
    """The extra files (config, tokenizer) go through the same branch; /dev/full answers ENOSPC."""
    model = crosschip.from_pretrained(source)

    def tokenizer_files(directory):
        with open("/dev/full", "w") as full:
            full.write("x" * 8192)

    with pytest.raises(CheckpointError, match=rf"cannot write a checkpoint to {tmp_path / 'out'}: the disk is full "
                                              r"\(errno ENOSPC: No space left on device\)"):
        model.save_pretrained(tmp_path / "out", extra_files=tokenizer_files)
    assert not (tmp_path / "out").exists()
