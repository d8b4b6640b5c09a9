"""Move batches to the device ahead of use (on a side CUDA stream when the device is a GPU)."""
import torch


def move_to_device(samples, targets, device, non_blocking=False):
    """NestedTensor and list of target dicts -> the same on ``device`` (non-tensor values kept as they are)."""
    samples = samples.to(device, non_blocking=non_blocking)
    targets = [
        {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]
    return samples, targets


class data_prefetcher:
    """Iterate a DataLoader of ``(NestedTensor, targets)``; ``next()`` gives ``(None, None)`` once exhausted.

    On CUDA with ``prefetch`` the next batch is copied on a side stream while the current one is used;
    otherwise each batch is moved with a plain ``.to(device)`` when asked for.
    """

    def __init__(self, loader, device, prefetch=True):
        self.loader = iter(loader)
        self.device = torch.device(device)
        self.prefetch = prefetch and self.device.type == "cuda"
        if self.prefetch:
            self.stream = torch.cuda.Stream(device=self.device)
            self._preload()

    def _preload(self):
        try:
            samples, targets = next(self.loader)
        except StopIteration:
            self.next_samples, self.next_targets = None, None
            return
        with torch.cuda.stream(self.stream):
            self.next_samples, self.next_targets = move_to_device(samples, targets, self.device,
                                                                  non_blocking=True)

    def next(self):
        if not self.prefetch:
            try:
                samples, targets = next(self.loader)
            except StopIteration:
                return None, None
            return move_to_device(samples, targets, self.device)

        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        samples, targets = self.next_samples, self.next_targets
        if samples is not None:
            # the tensors were allocated on the side stream: keep them alive for the compute stream
            samples.record_stream(current)
            for target in targets:
                for value in target.values():
                    if torch.is_tensor(value):
                        value.record_stream(current)
            self._preload()
        return samples, targets
