"""The Homebrew formula (formula/mtplx.rb) and the sdist it installs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORMULA = ROOT / "formula" / "mtplx.rb"

needs_ruby = pytest.mark.skipif(shutil.which("ruby") is None,
                                reason="ruby is not on PATH (apt-get install ruby / brew install ruby)")
needs_build = pytest.mark.skipif(importlib.util.find_spec("build") is None,
                                 reason="the 'build' package is not installed (pip install build; it is in the test extra)")


def _update_formula():
    spec = importlib.util.spec_from_file_location("update_formula", ROOT / "formula" / "update_formula.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


uf = _update_formula()
VERSION = uf.project_version()


def _top_level(field: str) -> str:
    # Two-space indent: the formula's own url/sha256, not a resource's (four spaces).
    m = re.search(rf'^  {field} "([^"]*)"$', FORMULA.read_text(encoding="utf-8"), flags=re.M)
    assert m, f"no top-level {field} in {FORMULA}"
    return m.group(1)


# A stand-in for Homebrew's DSL, just enough to evaluate the class body and report what it declares.
RUBY_HARNESS = r'''
require "json"
module Language; module Python; module Virtualenv; end; end; end
class ResourceSpec
  attr_reader :fields
  def initialize; @fields = {}; end
  def url(value, **_opts); @fields["url"] = value; end
  def sha256(value); @fields["sha256"] = value; end
end
class Formula
  class << self
    attr_reader :info
    def inherited(sub)
      super
      sub.instance_variable_set(:@info, { "resources" => {}, "depends_on" => [] })
    end
    %w[desc homepage url sha256 license].each { |k| define_method(k) { |v, **_o| @info[k] = v } }
    def depends_on(spec)
      @info["depends_on"] << case spec
                             when Hash then spec.map { |k, v| "#{k}=#{v}" }.join(",")
                             when Symbol then ":#{spec}"
                             else spec.to_s
                             end
    end
    def resource(name, &block)
      r = ResourceSpec.new
      r.instance_eval(&block)
      @info["resources"][name] = r.fields
    end
    def test(&block); @info["test"] = !block.nil?; end
  end
end
load ARGV[0]
k = Object.const_get(:Mtplx)
puts JSON.generate(k.info.merge("wheels" => k::WHEELS, "includes_virtualenv" => k.include?(Language::Python::Virtualenv),
                                "defines_install" => k.instance_methods(false).include?(:install)))
'''


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> dict:
    if shutil.which("ruby") is None:
        pytest.skip("ruby is not on PATH (apt-get install ruby / brew install ruby)")
    harness = tmp_path_factory.mktemp("ruby") / "harness.rb"
    harness.write_text(RUBY_HARNESS, encoding="utf-8")
    out = subprocess.run(["ruby", str(harness), str(FORMULA)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@needs_ruby
def test_formula_is_valid_ruby():
    out = subprocess.run(["ruby", "-c", str(FORMULA)], capture_output=True, text=True)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_formula_version_and_url_match_pyproject():
    assert _top_level("url") == f"https://files.pythonhosted.org/packages/source/m/mtplx/mtplx-{VERSION}.tar.gz"
    sha = _top_level("sha256")
    assert re.fullmatch(r"[0-9a-f]{64}", sha) and set(sha) != {"0"}, "placeholder sha256: run formula/update_formula.py"


def test_formula_follows_homebrew_python_conventions(declared):
    assert declared["includes_virtualenv"] and declared["defines_install"] and declared["test"]
    assert {"python@3.12", "arch=arm64", ":macos"} <= set(declared["depends_on"])
    text = FORMULA.read_text(encoding="utf-8")
    assert "virtualenv_install_with_resources" in text
    test_block = text[text.index("  test do"):]
    assert '#{bin}/mtplx --version' in test_block and "version.to_s" in test_block
    assert "mtplx inspect" in test_block  # a command that needs no model download and no GPU


def test_resources_are_real_and_cover_the_runtime_dependencies(declared):
    resources = declared["resources"]
    for name, r in resources.items():
        assert r["url"].startswith("https://files.pythonhosted.org/packages/"), name
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"]) and set(r["sha256"]) != {"0"}, name
    wheels = {n for n, r in resources.items() if r["url"].endswith(".whl")}
    assert wheels == set(declared["wheels"]), "wheel resources must be exactly the WHEELS the install step handles"
    for n in wheels:
        assert re.search(r"-(py3|cp312|cp3\d+-abi3|cp38-abi3)[^/]*(none-any|macosx_\d+_\d+_arm64)\.whl$",
                         resources[n]["url"]), f"{n}: not a wheel python@3.12 on Apple silicon can install"
    direct = {uf.canonicalize_name(r.name) for r in map(uf.Requirement, uf.project()["dependencies"])
              if uf._darwin(r.marker, set())}
    assert direct == {"mlx", "mlx-lm", "safetensors", "huggingface-hub", "transformers", "click", "jsonschema",
                      "llguidance", "fastapi", "uvicorn", "numpy", "tqdm"}
    assert direct <= set(resources), f"missing resources: {sorted(direct - set(resources))}"
    assert "mlx-metal" in resources  # mlx's Darwin-only dependency: markers were judged for macOS


def test_rewrite_formula_touches_only_the_top_level_url_and_sha():
    text = FORMULA.read_text(encoding="utf-8")
    new = uf.rewrite_formula(text, version="9.8.7", sha256="ab" * 32)
    assert 'url "https://files.pythonhosted.org/packages/source/m/mtplx/mtplx-9.8.7.tar.gz"' in new
    assert f'  sha256 "{"ab" * 32}"' in new
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert len(changed) == 2 and len(text.splitlines()) == len(new.splitlines())


def test_normalized_sdist_is_reproducible(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.txt").write_text("a")
    digests = []
    for i in range(2):
        os.utime(src / "pkg" / "a.txt", (1_000_000 + i, 1_000_000 + i))
        out = tmp_path / f"x{i}.tar.gz"
        with tarfile.open(out, "w:gz") as t:
            t.add(src / "pkg", arcname="pkg-1.0")
        uf.normalize_sdist(out)
        digests.append(uf.sha256_file(out))
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- the real sdist

@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install build; it is in the test extra)")
    return uf.build_sdist(tmp_path_factory.mktemp("sdist"))


@needs_build
@pytest.mark.skipif(not os.environ.get("MTPLX_RELEASE_CHECK"),
                    reason="release check (MTPLX_RELEASE_CHECK=1): every source change moves the sdist's sha256 "
                           "until `python formula/update_formula.py` runs at release")
def test_formula_sha256_is_that_of_a_fresh_sdist(sdist):
    assert uf.sha256_file(sdist) == _top_level("sha256"), (
        "formula/mtplx.rb is out of date with the sources: run `python formula/update_formula.py` "
        "(the sdist's contents changed since the formula was last updated)")


@needs_build
def test_sdist_contains_the_data_files(sdist):
    with tarfile.open(sdist) as t:
        names = set(t.getnames())
    top = f"mtplx-{VERSION}"
    for required in ("mtplx/demo/tiny-qwen35-mtp/mtplx_runtime.json", "mtplx/demo/tiny-qwen35-mtp/model.safetensors",
                     "mtplx/demo/tiny-qwen35-mtp/mtp/weights.safetensors", "mtplx/demo/tiny-qwen35-mtp/tokenizer.json",
                     "mtplx/data/probe.txt", "runtime_contracts/catalog.json", "runtime_contracts/schema.json"):
        assert f"{top}/{required}" in names, f"{required} is missing from the sdist"


def venv_seeing_these_packages(venv: Path) -> Path:
    """A fresh virtualenv that also sees every package this interpreter sees; returns its python.

    So the test does not download and build a gigabyte of dependencies, the venv borrows the
    MLX, transformers, ... installed here. `python -m venv --system-site-packages` cannot do
    that from inside a virtualenv: the new venv is built on the *base* interpreter and sees its
    site-packages, not this venv's, where pip put mtplx's dependencies (the README's test
    command then failed inside a venv). Instead: a plain venv, and a .pth file listing this
    interpreter's own site directories. Plain path lines in a .pth do not run those
    directories' own .pth files, so an editable install of mtplx there stays invisible, and the
    venv's own site-packages comes first on sys.path.
    """
    import site
    import sysconfig

    # No pip of its own (ensurepip takes seconds): the caller installs with this interpreter's
    # pip, ``pip --python``.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    ours += [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    dirs = list(dict.fromkeys(d for d in ours if os.path.isdir(d) and Path(d).resolve() != Path(purelib).resolve()))
    Path(purelib, "_mtplx_test_borrowed_site.pth").write_text("".join(f"{d}\n" for d in dirs), encoding="utf-8")
    return py


@needs_build
def test_sdist_installs_and_runs_in_a_fresh_venv(sdist, tmp_path):
    venv = tmp_path / "venv"
    # mtplx itself is installed from the sdist into the venv (--force-reinstall --no-deps).
    py = venv_seeing_these_packages(venv)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                    "--disable-pip-version-check", "--no-deps", "--force-reinstall", str(sdist)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MTPLX_CONFIG=str(tmp_path / "config.json"), HF_HUB_OFFLINE="1")

    where = subprocess.run([str(py), "-c", "import mtplx; print(mtplx.__file__)"], capture_output=True, text=True,
                           check=True, cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed sdist"

    mtplx = str(venv / "bin" / "mtplx")
    version = subprocess.run([mtplx, "--version"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"mtplx, version {VERSION}", version

    # At a fixed depth, so the installed head drafts (its weights are package data) without the
    # seconds depth auto spends timing a fresh config's first run (tests/test_auto_depth.py).
    run = subprocess.run([mtplx, "run", "--model", "demo", "-n", "8", "--raw", "-t", "0", "--depth", "3", "def f("],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), f"no completion printed; stderr: {run.stderr}"
    assert run.stderr.startswith("[MTP d3 | 8 tokens"), run.stderr
