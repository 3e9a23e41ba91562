"""What building the next job's stack during a render costs the render, and what it saves the switch.

The daemon builds the stack of the job queued next while the current job renders (`LoraPatcher.prebuild`:
files read, resolved and written on the prefetch thread, buffers allocated by the render thread at a step
boundary). On a GPU the render runs on the device; on a CPU the build takes cores from it. Measured here,
in one run:
- the render: transformer steps run back to back on one thread that also serves the prebuild's
  allocation at each step boundary, as the daemon's render thread does. Each round times the steps that
  overlap a prebuild of a full-depth 3-LoRA stack (19 + 38 blocks, rank 16, bf16, 504 layers) while
  another such stack is live, then as many steps alone; the ratio is the median of the rounds' (mean step
  during / mean step alone). On a CPU the steps are the tiny (mini) model's at 128 px and the stacks are
  built for mflux's Flux.1-dev transformer with lazy weights (a full-depth model cannot render here); on
  a GPU (MLX's CUDA backend) the steps are Flux.1-dev's at full size and 1024 px (random bf16 weights),
  and the stacks are built for that very model;
- a cold switch to the same stack with nothing beside it (what the next job's switch costs without a
  prebuild), and the switch after the prebuild.
The daemon's heap policy is set first, and the setup (models, patcher, files) is frozen out of the garbage
collector's scans before anything is timed, as `easel serve` does once started (daemon/engine/heap.py).

`added_vs_cold` is the time the prebuild added to the render (the steps it overlapped, less as many steps
alone) over the cold switch it saves the next job: on a GPU it should be near 0, on a CPU near 1 (the same
work moved into the render). The prebuild's own time includes its wait for a step boundary.

Last line: `bench prebuild: step_slowdown=... added_vs_cold=... switch_ms=... cold_switch_ms=...`
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_lora", ROOT / "bench" / "lora.py")
bench_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_lora)  # its helpers: lazy transformer, LoRA files, patcher, heap policy

import os  # noqa: E402

ROUNDS = int(os.environ.get("EASEL_BENCH_ROUNDS", "5"))


def tiny_step():
    """One 128 px transformer step of the tiny model (its preset's prompt length), as a function."""
    import mlx.core as mx
    import numpy as np
    from mflux.models.common.config.config import Config

    from daemon.engine.model import load_model

    model = load_model("tiny")
    transformer = model.flux.transformer
    text_tokens = int(model.preset.t5_max_length or 512)
    rng = np.random.default_rng(0)
    config = Config(model.flux.model_config, num_inference_steps=2, height=128, width=128, guidance=3.5)
    hidden = mx.array(rng.standard_normal((1, 64, 64)).astype(np.float32))
    prompt = mx.array(rng.standard_normal((1, text_tokens, 4096)).astype(np.float32))
    pooled = mx.array(rng.standard_normal((1, 768)).astype(np.float32))

    def step() -> float:
        t0 = time.perf_counter()
        mx.eval(
            transformer(t=0, config=config, hidden_states=hidden, prompt_embeds=prompt, pooled_prompt_embeds=pooled)
        )
        return (time.perf_counter() - t0) * 1000

    return step


def main() -> None:
    import mlx.core as mx
    import numpy as np

    from daemon.config import ServiceConfig
    from daemon.model_thread import ModelThreadCalls

    print(bench_lora.retain_freed(ServiceConfig().heap_retain_bytes).describe())
    if mx.default_device() != mx.cpu:  # the stack is prebuilt for the very model that renders
        full = bench_lora.evaluated_transformer(19, 38)
        full_step = bench_lora.timed_step(full, 1024, np.random.default_rng(0))

        def step() -> float:
            return full_step()[0]

        what = f"Flux.1-dev full size ({mx.default_device()}) 1024 px steps"
    else:  # a full-depth model cannot render here: the tiny model renders, a lazy full-depth one is patched
        step, full = tiny_step(), bench_lora.lazy_transformer(19, 38)
        what = "tiny model 128 px steps"
    step()
    with tempfile.TemporaryDirectory(prefix="easel-bench-prebuild-") as tmp_name:
        files = bench_lora.make_files(Path(tmp_name), bench_lora.linear_layout(full), "pre")
        a, b = bench_lora.stacks_of(files)
        patcher = bench_lora.new_patcher(full)
        bench_lora.read_ms(files)  # page cache warm
        bench_lora.freeze_long_lived()  # the setup out of the collector's scans, as `easel serve` does

        def clear() -> None:
            patcher.clear()
            patcher.cache.clear()
            patcher.resident.clear()
            patcher.apply_stack(a)  # the job now rendering has its stack live
            patcher.cache.clear()

        colds, prebuilds, switches, ratios, added = [], [], [], [], []
        for _ in range(ROUNDS):
            clear()
            colds.append(bench_lora.timed(lambda: patcher.apply_stack(b)))
            clear()
            calls, took = ModelThreadCalls(), []

            def prebuild(calls=calls, took=took) -> None:
                took.append(bench_lora.timed(lambda: patcher.prebuild(b, calls.call)))

            builder = threading.Thread(target=prebuild)
            during = []
            calls.open()
            builder.start()
            while builder.is_alive():  # this thread is the render thread: steps, and the allocation between them
                calls.run_pending()
                during.append(step())
            builder.join()
            calls.close()
            alone = [step() for _ in during]
            prebuilds.append(took[0])
            ratios.append(statistics.mean(during) / statistics.mean(alone))
            added.append(sum(during) - statistics.mean(alone) * len(during))
            switches.append(bench_lora.timed(lambda: patcher.apply_stack(b)))
            print(
                f"round: cold switch {colds[-1]:.1f} ms; prebuild {took[0]:.1f} ms beside {len(during)} steps of "
                f"{statistics.mean(during):.1f} ms (alone {statistics.mean(alone):.1f} ms: {added[-1]:.1f} ms added "
                f"to the render); the switch after it {switches[-1]:.3f} ms",
                flush=True,
            )
        patcher.clear()
    slowdown, cold, extra = statistics.median(ratios), statistics.median(colds), statistics.median(added)
    print(
        f"{what} beside a full-depth prebuild / alone: median {slowdown:.3f} over {ROUNDS} rounds; "
        f"time added to the render {extra:.1f} ms against a cold switch of {cold:.1f} ms with nothing beside it; "
        f"the prebuild itself {statistics.median(prebuilds):.1f} ms (it waits for a step boundary to allocate)"
    )
    print(
        f"bench prebuild: step_slowdown={slowdown:.3f} added_vs_cold={extra / cold:.2f} "
        f"switch_ms={statistics.median(switches):.3f} cold_switch_ms={cold:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
