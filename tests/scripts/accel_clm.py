"""An ordinary Accelerate causal-LM training script (the shape of Accelerate's ``run_clm_no_trainer``).

The only rannc_hf change is the ``Accelerator`` import; ``ACCEL_CLM_PLAIN=1`` uses Accelerate's own
class instead (the reference run).

    python tests/scripts/accel_clm.py --output_dir /tmp/ref                             # plain, 1 process
    rannc-hf launch --rannc_config rannc.yaml --num_processes 2 tests/scripts/accel_clm.py --output_dir /tmp/pp2

Writes ``metrics.json`` (loss and lr of every optimizer step, eval loss), ``final.safetensors``
(the full trained weights), ``model/`` (``accelerator.save_model``) and ``step_<n>/`` checkpoints.
"""

import argparse
import json
import math
import os

import torch
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator, get_scheduler

if os.environ.get("ACCEL_CLM_PLAIN"):
    from accelerate import Accelerator
else:
    from rannc_hf import RanncAccelerator as Accelerator        # <- the one-line change


class TokenBlocks(Dataset):
    """Fixed-length blocks of token ids (what run_clm's group_texts produces)."""

    def __init__(self, n, block_size, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block_size), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--num_train_epochs", type=int, default=2)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=2)
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=0.5)
    p.add_argument("--checkpointing_steps", type=str, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None)
    p.add_argument("--stop_after_steps", type=int, default=None, help="simulate a crash after this many steps")
    p.add_argument("--train_samples", type=int, default=64)
    p.add_argument("--eval_samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare_separately", action="store_true")
    p.add_argument("--no_eval", action="store_true")
    return p.parse_args()


def main():
    args = parse_args()
    # a seedable sampler: the same data order for any number of replicas, and resumable per epoch
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(args.seed)

    config = GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = GPT2LMHeadModel(config)

    train_dataset = TokenBlocks(args.train_samples, 16, config.vocab_size, seed=1)
    eval_dataset = TokenBlocks(args.eval_samples, 16, config.vocab_size, seed=2)
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator,
                                 batch_size=args.per_device_eval_batch_size)

    no_decay = ["bias", "layer_norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"]
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)

    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True
    lr_scheduler = get_scheduler(
        name="linear", optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps if overrode_max_train_steps
        else args.max_train_steps * accelerator.num_processes,
    )

    if args.prepare_separately:     # the other common spelling: the model first, then the rest
        model = accelerator.prepare(model)
        optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
            optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    else:
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    checkpointing_steps = int(args.checkpointing_steps) if args.checkpointing_steps else None

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(f"total batch size {total_batch_size}, {args.max_train_steps} optimization steps")

    completed_steps = 0
    starting_epoch = 0
    resume_step = None
    history = []
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        with open(os.path.join(args.resume_from_checkpoint, "history.json")) as f:
            history = json.load(f)
        training_difference = os.path.splitext(os.path.basename(args.resume_from_checkpoint.rstrip("/")))[0]
        resume_step = int(training_difference.replace("step_", "")) * args.gradient_accumulation_steps
        starting_epoch = resume_step // len(train_dataloader)
        completed_steps = resume_step // args.gradient_accumulation_steps
        resume_step -= starting_epoch * len(train_dataloader)

    step_loss = 0.0
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        if args.resume_from_checkpoint and epoch == starting_epoch and resume_step is not None:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
        else:
            active_dataloader = train_dataloader
        for step, batch in enumerate(active_dataloader):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                step_loss += accelerator.reduce(loss.detach().float(), "mean").item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                history.append({"step": completed_steps, "loss": step_loss, "lr": lr_scheduler.get_last_lr()[0],
                                "grad_norm": float(grad_norm)})
                step_loss = 0.0
                if checkpointing_steps and completed_steps % checkpointing_steps == 0:
                    out = os.path.join(args.output_dir, f"step_{completed_steps}")
                    accelerator.save_state(out)
                    if accelerator.is_main_process:
                        with open(os.path.join(out, "history.json"), "w") as f:
                            json.dump(history, f)
                if args.stop_after_steps and completed_steps >= args.stop_after_steps:
                    accelerator.wait_for_everyone()
                    accelerator.end_training()
                    return
            if completed_steps >= args.max_train_steps:
                break

        eval_loss = float("nan")
        if args.no_eval:
            continue
        model.eval()
        losses = []
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            loss = outputs.loss
            losses.append(accelerator.gather_for_metrics(loss.repeat(args.per_device_eval_batch_size)))
        eval_loss = torch.mean(torch.cat(losses)).item()
        accelerator.print(f"epoch {epoch}: eval_loss {eval_loss:.6f} perplexity {math.exp(eval_loss):.3f}")

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    accelerator.save_model(model, os.path.join(args.output_dir, "model"))
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()},
                  os.path.join(args.output_dir, "final.safetensors"))
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump({"history": history, "eval_loss": eval_loss, "num_processes": accelerator.num_processes,
                       "mixed_precision": accelerator.mixed_precision,
                       "stages": getattr(accelerator, "num_stages", 1)}, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
