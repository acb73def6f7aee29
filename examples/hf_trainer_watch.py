"""Keep watch over a Hugging Face Trainer run with InitDoctorCallback (pip install initdoctor[transformers]).

    python examples/hf_trainer_watch.py           # then: tensorboard --logdir runs/hf
    python examples/hf_trainer_watch.py --steps 20 --every 5 --output-dir /tmp/hf

A tiny BERT classifier built from a config (nothing is downloaded) trains on random token
sequences. Its `initializer_range` of 1.0 instead of BERT's 0.02 pins the pooler's tanh at +-1
(ID301): the callback reports it once, and writes its metrics into the Trainer's own TensorBoard run,
beside `train/loss`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: the model is built from a config

import torch  # noqa: E402
import transformers  # noqa: E402

from initdoctor.integrations.transformers import InitDoctorCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Random sequences labelled by whether token 0 appears in the first half."""

    def __init__(self, n: int = 256, length: int = 16, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, : length // 2] < 10).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(steps: int = 60, every: int = 20, output_dir: str = "runs/hf", init_range: float = 1.0) -> dict:
    transformers.set_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     initializer_range=init_range)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16,
                                          logging_steps=5, save_strategy="no", report_to=["tensorboard"],
                                          use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3)
    doctor = InitDoctorCallback(every=every)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[doctor]).train()
    print(f"TensorBoard run: {doctor.run_dir}")
    return {"run": doctor.run_dir, "samples": [h["step"] for h in doctor.doctor.history],
            "start": sorted(doctor.check.codes()) if doctor.check else []}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--output-dir", default="runs/hf")
    a = p.parse_args()
    main(a.steps, a.every, a.output_dir)
