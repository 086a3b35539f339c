"""SALMONN in 4-bit: LoRA kept as adapters on the quantized layers (what the app does) or merged before quantizing?

Both routes load through the product's own loader (LocalBackend, bitsandbytes NF4 on load) from the tiny
parts of testkit/tiny/salmonn.py and are compared with the unquantized model's last-position logits on the
three parity clips. "Merged" writes a Vicuna folder whose q_proj and v_proj already hold W + (alpha/r)·B·A,
and a checkpoint whose LoRA B is zero, then quantizes that. The tiny checkpoint's random LoRA is as large as
the weights it adapts, unlike a trained one, so each route is also measured with the LoRA scaled down to a
relative size of RELATIVE_LORA (of the adapted weight's norm), closer to a fine-tune.
Run: .venv/bin/python -m bench.salmonn_lora
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import print_table  # noqa: E402
from chat.clip import Clip  # noqa: E402
from chat.conversation import Conversation  # noqa: E402
from chat.local import LocalBackend  # noqa: E402
from testkit.parity.salmonn_cases import CASES, SAMPLE_RATE, clip  # noqa: E402
from testkit.tiny.salmonn import LORA_ALPHA, LORA_RANK, build_tiny_salmonn  # noqa: E402

RELATIVE_LORA = 0.05
PARTS = ("llama_path", "whisper_path", "beats_path", "ckpt")


def last_logits(backend: LocalBackend) -> torch.Tensor:
    """Last-position logits for each parity clip and its question, stacked."""
    rows = []
    for kind, seconds, seed, question in CASES.values():
        conversation = Conversation()
        conversation.add_user(question, [Clip.from_array(clip(kind, seconds, seed), SAMPLE_RATE)])
        inputs = backend.prepare(backend.family.renderer.render(conversation))
        with torch.no_grad():
            rows.append(backend.model(**inputs).logits[0, -1].float())
    return torch.stack(rows)


def variant(parts: Path, folder: Path, lora_scale: float, merged: bool) -> Path:
    """A decode yaml for the parts with LoRA B scaled, and with the LoRA merged into a Vicuna copy if asked."""
    config = yaml.safe_load((parts / "decode_config.yaml").read_text())
    model = config["model"]
    ckpt = torch.load(parts / model["ckpt"], weights_only=True)
    tensors = ckpt["model"]
    for name in [n for n in tensors if ".lora_B." in n]:
        tensors[name] = tensors[name] * lora_scale
    paths = {key: str(parts / model[key]) for key in PARTS}
    if merged:
        from safetensors.torch import load_file, save_file

        vicuna = folder / "vicuna-merged"
        vicuna.mkdir(parents=True)
        for file in (parts / model["llama_path"]).iterdir():
            (vicuna / file.name).write_bytes(file.read_bytes())
        weights = load_file(vicuna / "model.safetensors")
        for name in [n for n in tensors if ".lora_A." in n]:
            target = name.removeprefix("llama_model.base_model.model.").replace(".lora_A.default", "")
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            weights[target] = weights[target] + LORA_ALPHA / LORA_RANK * b @ tensors[name]
            tensors[name.replace(".lora_A.", ".lora_B.")] = torch.zeros_like(b)
        save_file(weights, vicuna / "model.safetensors", metadata={"format": "pt"})
        paths["llama_path"] = str(vicuna)
    torch.save(ckpt, folder / "salmonn.pth")
    config["model"] |= paths | {"ckpt": str(folder / "salmonn.pth")}
    path = folder / "decode_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lora_scale_for(parts: Path, relative: float | None) -> float:
    """The factor on LoRA B that makes ‖(alpha/r)·B·A‖ the given share of ‖W‖ (1: as stored)."""
    if relative is None:
        return 1.0
    from safetensors.torch import load_file

    model = yaml.safe_load((parts / "decode_config.yaml").read_text())["model"]
    tensors = torch.load(parts / model["ckpt"], weights_only=True)["model"]
    weights = load_file(parts / model["llama_path"] / "model.safetensors")
    name = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    delta = LORA_ALPHA / LORA_RANK * tensors[name.replace("lora_A", "lora_B")] @ tensors[name]
    return relative * weights["model.layers.0.self_attn.q_proj.weight"].norm().item() / delta.norm().item()


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        parts = build_tiny_salmonn(Path(scratch) / "parts").parent
        for relative in (None, RELATIVE_LORA):
            scale = lora_scale_for(parts, relative)
            size = "as stored (random)" if relative is None else f"{relative:.0%} of W"
            reference = last_logits(LocalBackend(str(variant(parts, Path(tempfile.mkdtemp(dir=scratch)), scale,
                                                             merged=False)), quantization="none"))
            for merged in (False, True):
                yaml_path = variant(parts, Path(tempfile.mkdtemp(dir=scratch)), scale, merged)
                logits = last_logits(LocalBackend(str(yaml_path), quantization="4bit"))
                difference = (logits - reference).abs()
                correlation = torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1]
                same_top = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
                rows.append([size, "merged, then NF4" if merged else "NF4 + LoRA adapters (the app)",
                             f"{difference.mean():.4f}", f"{difference.max():.3f}", f"{correlation:.4f}",
                             f"{same_top:.0%}"])
    print_table("SALMONN tiny parts: 4-bit logits against the unquantized model's, 3 clips",
                ["LoRA size", "route", "mean |Δ logit|", "max |Δ logit|", "correlation", "same top token"], rows)


if __name__ == "__main__":
    main()
