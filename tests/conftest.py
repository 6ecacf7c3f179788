import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import oracle  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(case, dtype=None, shard=None) -> (directory, HF model); built once per session."""
    cache = {}

    def make(case: str, dtype: str | None = None, shard: str | None = None):
        key = (case, dtype, shard)
        if key not in cache:
            import torch

            model = oracle.build(case)
            path = tmp_path_factory.mktemp(f"{case}-{dtype or 'f32'}-{shard or 'one'}")
            if dtype == "bf16":
                # The oracle keeps computing in f32, from the same bf16-rounded weights that get saved.
                with torch.no_grad():
                    for t in model.state_dict().values():
                        if t.is_floating_point():
                            t.copy_(t.to(torch.bfloat16).float())
                # (model.to(bf16) would also round the non-persistent RoPE buffers of the oracle)
                state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                         for k, v in model.state_dict().items()}
                model.save_pretrained(path, state_dict=state, max_shard_size=shard or "50GB")
            else:
                model.save_pretrained(path, max_shard_size=shard or "50GB")
            cache[key] = (str(path), model)
        return cache[key]

    return make


@pytest.fixture
def token_ids():
    return np.random.default_rng(0).integers(0, 128, 21)
