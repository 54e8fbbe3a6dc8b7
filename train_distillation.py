"""White-box knowledge distillation: a small student learns a frozen teacher's next-token distributions.

Both models read the same tokenizer. The student is described by the usual model flags (default 512x8, from
out/full_sft_512.pth), the teacher by --teacher_dim/--teacher_n_layers/--teacher_use_moe (default 768x16, from
out/full_sft_768.pth, i.e. train_full_sft.py --dim 768 --n_layers 16). On the assistant tokens of SFT
conversations (the SFT loss mask) the student minimises

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over the vocabulary and averaged over the counted positions; T^2 keeps the soft term's
gradient scale independent of the temperature (Hinton et al., 2015). Writes out/full_dist_{dim}[_moe].pth and its
_resume.pth, _metrics.jsonl and _loss.png; the log shows ce and kl separately.

A student as wide as its teacher but shallower can start from the teacher itself (--init_from_teacher 1, with
--from_weight none): its embedding, final norm and every (teacher layers / student layers)-th block, as DistilBERT
(Sanh et al., 2019) initialises its student. It then starts close to the teacher instead of from noise.

Run (from the repository root, data in ./dataset/sft_mini_512.jsonl):
    python train_distillation.py                                    # student 512x8 <- teacher 768x16
    python train_distillation.py --alpha 0 --temperature 1          # pure distillation, no hard labels
    python train_distillation.py --teacher_dim 640 --teacher_n_layers 8 --teacher_use_moe 1   # an MoE teacher
    python train_distillation.py --dim 768 --n_layers 8 --teacher_n_layers 16 --from_weight none --init_from_teacher 1
    torchrun --nproc_per_node 2 train_distillation.py               # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_distillation.py --deepspeed ds_config.json
    python train_distillation.py --resume 1                         # continue where the last checkpoint left off
    python train_distillation.py --packed 1                         # whole conversations side by side, no padding
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import resolve_from_weight, weights_path
from model.common import MissingInputError
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, str2bool,
    train_settings, training_data, training_parser,
)
from model.loading import load_into_model, model_from_args
from model.dataset import Batch
from model.LMConfig import LMConfig
from model.model import MiniMindLM
from model.trainer import LossFn, Trainer, masked_cross_entropy, with_moe_aux_loss


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over the counted positions of KL(softmax(teacher / T) || softmax(student / T)), summed over the vocab.

    student_logits, teacher_logits (B, T, V); loss_mask (B, T). No counted position gives 0."""
    counted = loss_mask.flatten() > 0  # (B*T,)
    student = student_logits.flatten(0, 1)[counted].float() / temperature  # (N, V)
    teacher = teacher_logits.flatten(0, 1)[counted].float() / temperature  # (N, V)
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    student_log_probs = F.log_softmax(student, dim=-1)
    per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)  # (N,)
    return per_position.sum() / counted.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor, alpha: float, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl): loss = alpha * ce + (1 - alpha) * T^2 * kl, both terms over the loss_mask positions."""
    ce = masked_cross_entropy(student_logits, labels, loss_mask)
    kl = soft_kl(student_logits, teacher_logits, loss_mask, temperature)
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl


def teacher_blocks_for(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher block each student block starts from: every (teacher/student)-th, from the first
    (4 -> 2: blocks 0 and 2; 16 -> 8: 0, 2, ..., 14)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student of {student_layers} blocks cannot start from a teacher of {teacher_layers}")
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def student_state_from_teacher(teacher_state: dict[str, torch.Tensor], blocks: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's weights with only the chosen blocks, renumbered 0..len(blocks)-1; everything outside the
    blocks (embedding, final norm, output head) is kept as it is."""
    student_of = {teacher_block: student_block for student_block, teacher_block in enumerate(blocks)}
    state = {}
    for name, tensor in teacher_state.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) in student_of:
                state[f"layers.{student_of[int(index)]}.{rest}"] = tensor.clone()
        else:
            state[name] = tensor.clone()
    return state


def make_distillation_loss(teacher: nn.Module, alpha: float, temperature: float) -> LossFn:
    """The Trainer's loss function: the student (the model being trained) against the frozen `teacher`."""

    def distillation_step(model: nn.Module, batch: Batch):
        inputs, labels, loss_mask = batch  # (B, T) each
        with torch.no_grad():  # packed rows: the teacher, too, reads each document alone
            teacher_logits = teacher(inputs, document_ids=batch.document_ids).logits  # (B, T, V)
        out = model(inputs, document_ids=batch.document_ids)
        loss, ce, kl = distillation_loss(out.logits, teacher_logits, labels, loss_mask, alpha, temperature)
        return with_moe_aux_loss(loss, out, {"ce": ce.detach(), "kl": kl.detach()})

    return distillation_step


def main(argv: list[str] | None = None) -> Trainer:
    """Run the stage with these command-line arguments (default: sys.argv); returns the finished Trainer."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/sft_mini_512.jsonl",
        learning_rate=5e-6,
        wandb_project="MiniMind-Distillation",
        from_weight="full_sft",
        epochs=6,
        batch_size=32,
        accumulation_steps=1,
        max_seq_len=512,
    )
    group = parser.add_argument_group("distillation (the student is the model above)")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE; 1 - alpha goes to the KL")
    group.add_argument("--temperature", type=float, default=1.5, help="softmax temperature T of both models in the KL")
    group.add_argument("--teacher_dim", type=int, default=768, help="teacher hidden size")
    group.add_argument("--teacher_n_layers", type=int, default=16, help="teacher transformer blocks")
    group.add_argument("--teacher_n_heads", type=int, default=8, help="teacher query heads")
    group.add_argument("--teacher_n_kv_heads", type=int, default=2, help="teacher key/value heads")
    group.add_argument("--teacher_use_moe", type=str2bool, default=False, help="teacher is a mixture-of-experts model (1/0)")
    group.add_argument("--teacher_weight", default="full_sft",
                       help="teacher weights: a stage name ('full_sft' -> OUT_DIR/full_sft_{teacher_dim}[_moe].pth) or a .pth path")
    group.add_argument("--init_from_teacher", type=str2bool, default=False,
                       help="start the student from the teacher's embedding, norm and every k-th block (same widths; "
                            "needs --from_weight none) (1/0)")
    args = parse_training_args(parser, argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.teacher_weight.lower() == "none":
        parser.error("--teacher_weight none: the teacher must be a trained model (a stage name or a .pth path)")
    if args.init_from_teacher:
        if args.from_weight.lower() != "none":
            parser.error(f"--init_from_teacher 1 starts the student from the teacher: pass --from_weight none "
                         f"(got {args.from_weight!r})")
        shape = ("dim", "n_heads", "n_kv_heads", "use_moe")
        differing = [name for name in shape if getattr(args, name) != getattr(args, f"teacher_{name}")]
        if differing or args.n_layers > args.teacher_n_layers:
            parser.error(f"--init_from_teacher 1 needs a student as wide as the teacher ({', '.join(shape)} equal) "
                         f"and no deeper: student --dim {args.dim} --n_layers {args.n_layers} --n_heads {args.n_heads} "
                         f"--n_kv_heads {args.n_kv_heads}, teacher --teacher_dim {args.teacher_dim} --teacher_n_layers "
                         f"{args.teacher_n_layers} --teacher_n_heads {args.teacher_n_heads} --teacher_n_kv_heads "
                         f"{args.teacher_n_kv_heads}")

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: SFT conversations (one per sample, or packed with --packed 1); the loss covers the assistant replies only
    require_data(args, "sft_mini_512.jsonl")
    tokenizer = load_tokenizer(args)
    dataset, collate = training_data(args, tokenizer, ctx, chat=True)

    # Student: every weight trained, from the SFT weights of its size
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config

    # Teacher: same tokenizer (vocabulary), its own sizes, frozen (moved to the device by the Trainer, never
    # wrapped, optimized or saved)
    teacher_config = LMConfig(dim=args.teacher_dim, n_layers=args.teacher_n_layers, n_heads=args.teacher_n_heads,
                              n_kv_heads=args.teacher_n_kv_heads, vocab_size=len(tokenizer), use_moe=args.teacher_use_moe)
    teacher = MiniMindLM(teacher_config)
    try:
        teacher_weights = resolve_from_weight(args.teacher_weight, args.out_dir, teacher_config)
    except MissingInputError as error:
        raise MissingInputError(
            f"teacher weights (--teacher_weight {args.teacher_weight}, sizes --teacher_dim {args.teacher_dim} "
            f"--teacher_n_layers {args.teacher_n_layers} --teacher_use_moe {int(args.teacher_use_moe)}): {error}"
        ) from None
    load_into_model(teacher, teacher_weights, "train the teacher first (train_full_sft.py with the teacher's sizes)")
    if args.init_from_teacher:
        blocks = teacher_blocks_for(teacher_config.n_layers, config.n_layers)
        model.load_state_dict(student_state_from_teacher(teacher.state_dict(), blocks), strict=True)
        origin = f"the teacher's blocks {blocks}"
    if ctx.is_main:
        print(f"MiniMind distillation: student {model.num_parameters() / 1e6:.3f}M parameters from {origin}, teacher "
              f"{teacher.num_parameters() / 1e6:.3f}M from {teacher_weights}, alpha {args.alpha}, temperature "
              f"{args.temperature}, {len(dataset):,} samples, {ctx.world_size} process(es) on {ctx.device}",
              flush=True)

    # Loop and save
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, collate,
        make_distillation_loss(teacher, args.alpha, args.temperature),
        weights_file=weights_path(args.out_dir, "full_dist", config),
        frozen_models=[teacher],
    )
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
