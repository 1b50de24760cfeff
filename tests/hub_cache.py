"""A Hugging Face hub cache laid out on disk as huggingface_hub expects, for hub ids without the network."""
import shutil
from pathlib import Path

import pytest


def offline_hub(home: Path, monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]) -> Path:
    """`HF_HOME=home`, `HF_HUB_OFFLINE=1`, and each repo's `model.safetensors` (copied from its file) in the cache
    (`hub/models--<owner>--<name>/snapshots/<commit>`, `refs/main` naming the commit). huggingface_hub read both
    variables at import, so its constants are set too. Returns the cache folder."""
    cache, commit = home / 'hub', '0' * 40
    for repo, weights in repos.items():
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / 'snapshots' / commit).mkdir(parents=True)
        shutil.copyfile(weights, folder / 'snapshots' / commit / 'model.safetensors')
        (folder / 'refs').mkdir()
        (folder / 'refs' / 'main').write_text(commit)
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_OFFLINE', True)
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(cache))
    return cache
