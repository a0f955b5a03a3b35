"""The synthetic world's K-way labelling (`recipes.rm.label_synthetic`): K ~ U[k_min, k_max] answers per
prompt, round(K * pretrained_fraction) of them from the second policy, and no more samples drawn than
that takes."""
import ml_collections as mlc
import pytest

from rlhf_jax import generation
from rlhf_jax.data import gold
from rlhf_jax.recipes import rm as rm_recipe


@pytest.mark.parametrize("k_min,k_max,frac,second,expected", [
    (4, 9, 0.25, True, (7, 2)),     # the main job: K=9 takes 7 + 2, K=4 takes 3 + 1
    (4, 9, 0.5, True, (5, 4)),      # round half to even: K=9 -> 4 from the second, K=5 -> 3 from the first
    (4, 9, 0.25, False, (9, 0)),    # no second policy: everything from the first
    (2, 2, 0.0, True, (2, 0)),
])
def test_samples_needed_is_the_most_any_k_takes(k_min, k_max, frac, second, expected):
  lc = mlc.ConfigDict(dict(k_min=k_min, k_max=k_max, pretrained_fraction=frac))
  assert rm_recipe._samples_needed(lc, has_second=second) == expected
  for k in range(k_min, k_max + 1):
    n_pre = round(k * frac) if second else 0
    assert k - n_pre <= expected[0] and n_pre <= expected[1]


def test_label_synthetic_mixes_both_policies_and_draws_only_what_it_uses(tmp_path, monkeypatch):
  drawn = []

  def fake_sample(params, cfg, tok, prompts, rng, *, n_per_prompt, **kw):
    drawn.append((params, n_per_prompt))
    # Distinct, gold-distinguishable answers: the target with j filler words (j = 0 scores 1.0);
    # the second policy's answers carry its name, so each record's mix can be counted.
    out = []
    for m in prompts:
      answer = gold.resolve_task(m).answer
      out.append([" ".join([answer] + [params] * (j + (params == "pre") * 10)) for j in range(n_per_prompt)])
    return out

  monkeypatch.setattr(generation, "sample_responses", fake_sample)
  config = mlc.ConfigDict(dict(seed=0, max_prompt_len=32, label=dict(
      n_train_prompts=40, n_eval_prompts=8, k_min=4, k_max=9, temperature=0.7, noise_temperature=0.0,
      max_new_tokens=8, prompt_seed=1, batch_size=16, pretrained_fraction=0.25)))
  records = rm_recipe.label_synthetic(config, str(tmp_path), None, None, ("sft", "pre"), "train")
  assert drawn == [("sft", 7), ("pre", 2)]
  assert len(records) == 40
  ks = set()
  for r in records:
    k = len(r["responses"])
    ks.add(k)
    assert 4 <= k <= 9
    assert sum("pre" in s for s in r["responses"]) == round(k * 0.25)
  assert len(ks) > 1                                  # K varies across prompts
  again = rm_recipe.label_synthetic(config, str(tmp_path), None, None, ("sft", "pre"), "train")
  assert again == records and len(drawn) == 2         # read back from the cache, nothing sampled
