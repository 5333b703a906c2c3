# All-reduce time of a flat gradient buffer (44 M values: R50-FPN Mask R-CNN, every layer trainable)
# on this machine's GPUs, float32 and bf16, through torch.distributed (the yardstick for the
# trainer's all-reduce): python3 -m torch.distributed.run --nproc-per-node 2 scripts/nccl_allreduce_bench.py
import torch, torch.distributed as dist
dist.init_process_group("nccl")
r = dist.get_rank(); torch.cuda.set_device(r)
for n in [44_000_000, 22_000_000, 5_500_000]:
    for dtype in [torch.float32, torch.bfloat16]:
        x = torch.ones(n, device="cuda", dtype=dtype)
        for _ in range(5): dist.all_reduce(x)
        torch.cuda.synchronize(); dist.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(20):
            s.record(); dist.all_reduce(x); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        ts.sort()
        if r == 0: print(f"{n} {dtype}: median {ts[10]:.3f} ms, min {ts[0]:.3f} ms, {n * x.element_size() / ts[10] / 1e6:.1f} GB/s algbw", flush=True)
dist.destroy_process_group()
