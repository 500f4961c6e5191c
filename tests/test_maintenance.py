"""Cache upkeep on the tiny Flux model: status counts, verify (and repair) against the stored sha256s,
prune of what a config no longer uses, and a drop interrupted between its two steps losing nothing; a foreign
entry under a right key; weights rewritten in place found by --rehash."""

import json
import os
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.data.kinds import check_complete
from pipeline.cache.maintenance import needed_keys, prune, status, verify
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.cli import main
from pipeline.data.plan import make_plan

COMPUTED = ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed")


def work(summary):
    return sum(summary[k] for k in COMPUTED)


def contents(cache_dir):
    store = Store(cache_dir)
    out = {(kind, key): store.read(kind, key)[0] for kind in store.kinds() for key in store.keys(kind)}
    store.close()
    return out


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@pytest.mark.e2e
def test_status_and_prune_across_dtypes(project):
    path, cfg = project()
    run_cache(cfg, progress=False)
    _, fp32 = project(name="fp32.toml", dtype="fp32")
    run_cache(fp32, progress=False)

    s = status(cfg)
    assert s["dtypes_with_priors"] == ["bf16", "fp32"] and s["dtype"] == "bf16"
    assert all(k["missing"] == 0 for k in s["kinds"].values())
    for kind in ("latent", "text", "noise", "prior/bf16"):
        assert s["kinds"][kind]["stale"] == 0 and s["kinds"][kind]["present"] == s["kinds"][kind]["needed"] > 0
    # the same config in another dtype is no other config: its priors are what prune removes (--keep-dtypes keeps)
    assert s["kinds"]["prior/fp32"] == {**s["kinds"]["prior/fp32"], "needed": 0, "other_configs": 0, "stale": 16}
    assert s["total_bytes"] == sum(k["bytes"] for k in s["kinds"].values())

    r = cli("cache", "status", "--config", path, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == s
    assert status(fp32)["kinds"]["prior/fp32"]["stale"] == 0  # --dtype / train.dtype picks the kind used

    assert prune(cfg, keep_dtypes=True)["entries_removed"] == {}
    before = contents(cfg.cache.dir)
    dry = prune(cfg, dry_run=True)
    assert dry["entries_removed"] == {"prior/fp32": 16} and dry["bytes_freed"] > 0
    assert contents(cfg.cache.dir).keys() == before.keys()
    r = cli("cache", "prune", "--config", path)
    assert r.exit_code == 0 and "prior/fp32        16 entries" in r.stdout
    assert status(cfg)["dtypes_with_priors"] == ["bf16"]
    assert status(fp32)["kinds"]["prior/fp32"]["missing"] == 16


@pytest.mark.e2e
def test_status_tells_entries_of_other_configs_from_entries_nobody_uses(project):
    _, cfg = project()
    run_cache(cfg, progress=False)
    other_path, other = project(name="other.toml", resolution=48)  # the same cache dir, other latents
    run_cache(other, progress=False)
    theirs = {k: status(other)["kinds"][k]["needed"] for k in ("latent", "noise", "prior/bf16")}
    kinds = status(cfg)["kinds"]
    for kind, n in theirs.items():
        assert (kinds[kind]["other_configs"], kinds[kind]["stale"]) == (n, 0), kind
    r = cli("cache", "status", "--config", project.root / "config.toml")
    assert r.exit_code == 0 and "  others   stale" in r.stdout
    other_path.unlink()  # a config file that is gone uses nothing: its entries are stale now
    assert all(status(cfg)["kinds"][k]["stale"] == n for k, n in theirs.items())


@pytest.mark.e2e
def test_prune_after_editing_an_image_keeps_everything_used(project):
    _, cfg = project()
    run_cache(cfg, progress=False)
    image = next(s for s in make_plan(cfg).samples if s.prior).path
    with Image.open(image) as im:
        im = im.convert("RGB")
        im.putpixel((0, 0), (0, 255, 0))
        im.save(image)

    kinds = status(cfg)["kinds"]
    assert (kinds["latent"]["missing"], kinds["latent"]["stale"]) == (1, 1)
    assert (kinds["noise"]["missing"], kinds["noise"]["stale"]) == (2, 2)
    assert (kinds["prior/bf16"]["missing"], kinds["prior/bf16"]["stale"]) == (2, 2)

    assert work(run_cache(cfg, progress=False)) == 5
    used = contents(cfg.cache.dir)
    dry = prune(cfg, dry_run=True)
    assert dry["entries_removed"] == {"latent": 1, "noise": 2, "prior/bf16": 2} and dry["bytes_freed"] > 0
    assert contents(cfg.cache.dir).keys() == used.keys()

    p = prune(cfg)
    assert p["entries_removed"] == dry["entries_removed"] and p["bytes_freed"] > 0 and not p["lost"]
    assert all(k["stale"] == 0 and k["missing"] == 0 for k in status(cfg)["kinds"].values())
    after = contents(cfg.cache.dir)
    assert len(after) == len(used) - 5
    assert all(torch.equal(after[e][n], t) for e in after for n, t in used[e].items())  # kept ones bitwise
    assert work(run_cache(cfg, progress=False)) == 0
    check_complete(make_plan(cfg), Store(cfg.cache.dir))


@pytest.mark.e2e
def test_verify_finds_a_flipped_prior_and_repair_recomputes_exactly_it(project):
    path, cfg = project()
    run_cache(cfg, progress=False)
    clean = verify(cfg)
    assert clean["damaged"] == [] and clean["missing"] == 0
    assert clean["checked"] == sum(map(len, needed_keys(make_plan(cfg)).values())) == 16 + 10 + 16 + 16  # noise: only prior draws are cached

    store = Store(cfg.cache.dir)
    key = sorted(store.keys("prior/bf16"))[3]
    segment = store.segment_of("prior/bf16", key)
    original = store.read("prior/bf16", key)[0]["prediction"]
    store.close()
    with h5py.File(segment, "r+") as f:  # damage on disk: data changed, sha256 attribute now stale
        ds = f[key]["prediction"]
        ds[0, 0, :4] = ds[0, 0, :4] ^ 0x5A5A

    found = verify(cfg)
    assert [(d["kind"], d["key"], d["segment"]) for d in found["damaged"]] == [("prior/bf16", key, str(segment))]
    assert "sha256 mismatch" in found["damaged"][0]["reason"]
    r = cli("cache", "verify", "--config", path)
    assert r.exit_code == 2 and key in r.stdout
    assert r.stderr.strip().splitlines()[-1].endswith(f"run python -m pipeline cache verify --config {path} --repair")

    r = cli("cache", "verify", "--config", path, "--repair")
    assert r.exit_code == 0 and "1 entries recomputed" in r.stdout
    assert verify(cfg)["damaged"] == []
    store = Store(cfg.cache.dir)
    assert torch.equal(store.read("prior/bf16", key)[0]["prediction"].view(torch.int16), original.view(torch.int16))


def test_drop_interrupted_before_unlink_loses_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write("latent", {k: ({"a": torch.full((3,), float(i))}, {"n": i}) for i, k in enumerate("abcd")})
    real_unlink = Path.unlink

    def crash(self, *a, **k):
        if self.suffix == ".h5" and not self.name.startswith("."):
            raise KeyboardInterrupt  # killed after the replacement is in place, before the old one goes
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", crash)
    try:
        store.drop("latent", {"b"})
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    again = Store(tmp_path)
    assert again.keys("latent") == set("abcd") and len(list((tmp_path / "segments").glob("*.h5"))) == 2
    r = again.drop("latent", {"b"})
    assert r["removed"] == 1 and not r["lost"]
    final = Store(tmp_path)
    assert final.keys("latent") == set("acd") and len(list((tmp_path / "segments").glob("*.h5"))) == 1
    assert all(final.check("latent", k) is None for k in "acd")
    tensors, attrs = final.read("latent", "d")
    assert torch.equal(tensors["a"], torch.full((3,), 3.0)) and attrs["n"] == 3


@pytest.mark.e2e
def test_cache_group_keeps_its_old_form_and_documents_the_subcommands(project):
    r = cli("cache")
    assert r.exit_code == 2 and "Missing option '--config'" in r.output
    for sub, opts in {"status": ["--json"], "verify": ["--repair"], "prune": ["--dry-run", "--keep-dtypes"]}.items():
        r = cli("cache", sub, "--help")
        assert r.exit_code == 0 and all(o in r.stdout for o in ["--config", "--dtype", *opts])
    path, _ = project()
    r = cli("cache", "--config", path, "status", "--json")  # options given to the group are lent to it
    assert r.exit_code == 0 and json.loads(r.stdout)["kinds"]["latent"]["missing"] == 16
    r = cli("cache", "status", "--config", path / "nope.toml")
    assert r.exit_code == 2 and r.stderr.startswith("error:")


@pytest.mark.e2e
def test_prune_in_a_cache_shared_with_another_config_needs_all_configs(project):
    path, cfg = project()
    run_cache(cfg, progress=False)
    other, other_cfg = project(name="other.toml", cache_seed=1)  # other noise draws, so other priors
    run_cache(other_cfg, progress=False)
    before = contents(cfg.cache.dir)

    r = cli("cache", "prune", "--config", path)  # would take the other config's noise draws and priors
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0, r.output
    assert f"is shared: prune would remove entries other configs use: {other} (noise 16, prior/bf16 16)" in r.stderr
    assert "--all-configs" in r.stderr and contents(cfg.cache.dir).keys() == before.keys()

    r = cli("cache", "prune", "--config", path, "--dry-run")
    assert r.exit_code == 0 and f"  of which {other} use: noise 16, prior/bf16 16" in r.stdout
    assert contents(cfg.cache.dir).keys() == before.keys()

    r = cli("cache", "prune", "--config", path, "--all-configs")
    assert r.exit_code == 0 and "noise             16 entries" in r.stdout
    assert status(other_cfg)["kinds"]["noise"]["missing"] == 16 and status(cfg)["kinds"]["noise"]["missing"] == 0

    run_cache(other_cfg, progress=False)
    other.unlink()  # a config that no longer exists uses nothing
    assert prune(cfg)["entries_removed"] == {"noise": 16, "prior/bf16": 16}


@pytest.mark.e2e
def test_status_on_a_new_cache_dir_creates_nothing(project):
    _, cfg = project()
    report = status(cfg)
    assert not (project.root / "cache").exists()  # neither the folder, nor its lock or fingerprints
    assert report is not None


@pytest.mark.e2e
def test_a_foreign_entry_under_a_right_key_is_found_by_verify_and_refused_by_training(project):
    path, cfg = project(dtype="fp32")  # one epoch: every sample's variant 0 is read
    run_cache(cfg, progress=False)
    plan = make_plan(cfg)
    store = Store(cfg.cache.dir)
    key = plan.training[0].latent_keys[0]
    tensors, attrs = store.read("latent", key)
    store.drop("latent", [key])
    # another model's latent under this key: 16 channels, intact bytes with a valid sha256
    store.write("latent", {key: ({**tensors, "latent": torch.zeros(16, *tensors["latent"].shape[1:])}, attrs)})
    text_key = plan.training[-1].text_keys[0]
    text, text_attrs = store.read("text", text_key)
    store.drop("text", [text_key])
    store.write("text", {text_key: ({n: t[:-1] for n, t in text.items()}, text_attrs)})  # one token short
    store.close()

    found = verify(cfg)
    reasons = {(d["kind"], d["key"]): d["reason"] for d in found["damaged"]}
    assert set(reasons) == {("latent", key), ("text", text_key)}, reasons
    assert reasons[("latent", key)].startswith("not this config's: its 'latent' is [16, ") and "needs [4, " in reasons[("latent", key)]
    assert "differ from the other text entries'" in reasons[("text", text_key)]

    r = cli("train", "--config", path, "--quiet")
    assert r.exit_code == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cache entry ") and "is not this config's: its " in line and "cache verify --repair" in line

    assert verify(cfg, repair=True)["repaired"] == 2 and verify(cfg)["damaged"] == []
    assert cli("train", "--config", path, "--quiet").exit_code == 0


@pytest.mark.e2e
def test_weights_rewritten_in_place_with_the_same_stamp_are_found_by_rehash(project, tiny_assets, tmp_path):
    shutil.copytree(tiny_assets / "model", tmp_path / "model")
    path, cfg = project(model=tmp_path / "model")
    run_cache(cfg, progress=False)
    weights = next((tmp_path / "model" / "vae").glob("*.safetensors"))
    st = weights.stat()
    with open(weights, "r+b") as f:  # same size, same inode; then the same mtime
        f.seek(st.st_size - 8)
        last = f.read(8)
        f.seek(st.st_size - 8)
        f.write(bytes(b ^ 0xFF for b in last))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_ino == st.st_ino and weights.stat().st_mtime_ns == st.st_mtime_ns

    assert status(cfg)["kinds"]["latent"]["missing"] == 0  # the memo's stamp cannot see it (documented)
    r = cli("cache", "verify", "--config", path, "--rehash")
    assert r.exit_code == 0, r.output
    assert "rehash: " in r.stdout and "changed: vae (" in r.stdout
    kinds = status(cfg)["kinds"]
    assert kinds["latent"]["missing"] == kinds["latent"]["needed"] > 0 and kinds["text"]["missing"] == 0
    r = cli("cache", "verify", "--config", path, "--rehash")
    assert "no fingerprint changed" in r.stdout
