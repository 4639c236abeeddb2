"""Profile q3lab's eager prefill at the real dimensions, T=512 and 4096: kernel time vs wall (launch-bound?).

The probe behind bench/logs/gpu_prefill_profile_h200_2026-12-01_3cd0626.txt (run on an H200: python3 bench/gpu_prefill_probe.py);
bench/gpu_decode.py --rows prefill --profile writes the same profiles next to its rows."""
import time, torch, statistics
from q3lab.base.config import ThinkerConfig
from q3lab.weights.synthetic import preset_config
from q3lab.runtime.thinker import Thinker, rope_inv_freq
from q3lab.runtime.experts import ResidentExperts
from torch.profiler import ProfilerActivity, profile
DEV = "cuda"
cfg = preset_config("full")
with torch.device("meta"):
    model = Thinker(cfg)
model = model.to_empty(device=DEV).to(torch.bfloat16)
g = torch.Generator(device=DEV).manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=g)
model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(DEV)
L, E, I, D = cfg.num_hidden_layers, cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
p = ResidentExperts()
p.config, p.device, p.dtype = cfg, torch.device(DEV), torch.bfloat16
p.gate = torch.empty(L, E, I, D, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
p.up = torch.empty(L, E, I, D, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
p.down = torch.empty(L, E, D, I, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
model.set_experts(p)
model.eval()
print("built", torch.cuda.memory_allocated() / 1e9, "GB", flush=True)
for T in (512, 4096):
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=DEV)
    with torch.inference_mode():
        f = lambda: model(ids, last_only=True)
        f(); torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        wall = statistics.median(ts)
        # CPU time to issue (no sync): how long Python takes to launch everything
        torch.cuda.synchronize(); t = time.perf_counter(); f(); t_issue = time.perf_counter() - t; torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            f(); torch.cuda.synchronize()
    ka = prof.key_averages()
    cuda = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
    tot = sum(e.self_device_time_total for e in cuda) / 1e3
    cnt = sum(e.count for e in cuda)
    print(f"T={T}: wall {wall*1e3:.1f} ms, host issue time {t_issue*1e3:.1f} ms, kernel time {tot:.1f} ms in {cnt} kernels", flush=True)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60), flush=True)
