"""Rebuild a full testbed folder from a variant's config and UNet weights (as gpu_variants.py brings back).

Text encoder, tokenizer and data are deterministic functions of the config, so only the UNet (and the
VAE, unless the recipe's cached one is given) has to travel back from the GPU machine.

    python scripts/testbed_probes/assemble_variant.py CONFIG.json UNET.safetensors VAE_DIR OUT [--train-seconds S]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from memprune.testbed.config import config_from_dict
from memprune.testbed.data import build_data
from memprune.testbed.export import write_testbed_folder
from memprune.testbed.model import assemble_pipeline, build_unet
from memprune.testbed.train import build_tokenizer_and_text_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("unet")
    parser.add_argument("vae_dir")
    parser.add_argument("out")
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--trained-on", default=None, help='e.g. "one NVIDIA H100 80GB HBM3 GPU"')
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(args.config) as f:
        cfg = config_from_dict(json.load(f))
    data = build_data(dataclasses.replace(cfg.data, seed=cfg.seed))
    tokenizer, text_encoder = build_tokenizer_and_text_encoder(cfg, data)
    vae = AutoencoderKL.from_pretrained(args.vae_dir)
    unet = build_unet(cfg.model.unet, cfg.model.vae.latent_channels, cfg.model.text.hidden_size)
    unet.load_state_dict({k: v.float() for k, v in load_file(args.unet).items()})
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet.eval(), cfg.model.scheduler)
    write_testbed_folder(pipe, data, cfg, args.out, train_seconds=args.train_seconds, trained_on=args.trained_on)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
