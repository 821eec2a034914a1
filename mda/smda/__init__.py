"""SMDA — Symbolic Mechanistic Data Attribution (Habibi, Lee & Seif El-Nasr, 2026).

Which supervised fine-tuning (SFT) pairs shaped a behaviour (refusal)? The behaviour is
distilled into a sparse linear policy over sparse-autoencoder (SAE) features, and each SFT
pair's influence on that policy is split into a feature-activation part (ΔX) and an
output-probability part (ΔY). The rooms, in pipeline order:

- `task`: the instruction task — prompts, SFT pairs, and the ground truth (mislabelled pairs);
- `lm`: the language model side — loading, prompt encoding, hidden states at the hooked
  layer, Y = log-probability of the refusal prefix, greedy generations;
- `sae`: a TopK SAE (trained here) or any SAELens-format SAE, one loader for both;
- `policy`: features by mean-activation difference, the closed-form ridge policy;
- `influence`: one SGD step per pair, ΔX / ΔY, ΔW_X / ΔW_Y, scores per pair / feature / pathway;
- `curate`: the median rule, random controls, precision/recall against the ground truth;
- `sft`: fine-tuning on a pair set through `mda.train.loop.Trainer` (response tokens only);
- `evaluate`: soft and greedy refusal metrics over seeds;
- `report`: the plots and the document (`reports/smda/`).
"""
