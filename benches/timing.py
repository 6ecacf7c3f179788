"""Timing a list of (pipeline, bind group, workgroups[, mirrors]) dispatches of a runner, for the kernel
benches: the kernels alone, without the copies of values into textures a step makes between them."""
import time


def seconds(runner, dispatches, reps: int) -> float:
    """Wall time of one submit of `reps` rounds of `dispatches`, divided by reps."""
    u = runner.wgpu.BufferUsage
    probe = runner.gpu.create_buffer(size=16, usage=u.MAP_READ | u.COPY_DST)
    enc = runner.gpu.create_command_encoder()
    cp = enc.begin_compute_pass()
    for _ in range(reps):
        for pipe, group, grid, *_ in dispatches:
            cp.set_pipeline(pipe)
            cp.set_bind_group(0, group)
            cp.dispatch_workgroups(*grid)
    cp.end()
    enc.copy_buffer_to_buffer(runner.slots[0], 0, probe, 0, 16)      # waits for the pass
    t0 = time.perf_counter()
    runner.gpu.queue.submit([enc.finish()])
    probe.map_sync(runner.wgpu.MapMode.READ)
    return (time.perf_counter() - t0) / reps
