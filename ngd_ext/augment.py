"""The training faces' augmentation, drawn for a whole batch at once on the batch's device: random crop (pad 4), flip,
a small affine turn and scale, and random erasing, from one generator, so that a resumed run repeats it exactly."""

import math

import torch
import torch.nn.functional as F


def augment(images, generator, size, part=slice(None)):
    """A batch of uint8 N x 48 x 48 images -> images[part] as float M x 1 x size x size, on the images' device: random
    crop (pad 4), flip, a small affine (rotation, scale), random erasing. All randomness comes from `generator` and
    is drawn for the whole batch, so a resumed run repeats it, and a DDP process (part = its share) gets the images
    one process would. Tensor operations over the whole batch, with no loop over the images: on a GPU the work stays
    on the GPU."""
    n = len(images)
    draws = (torch.randint(0, 9, (n, 2), generator=generator),  # crop offsets
             torch.rand(n, generator=generator) < 0.5,  # flip
             (torch.rand(n, generator=generator) - 0.5) * math.radians(20),  # angle
             1 + (torch.rand(n, generator=generator) - 0.5) * 0.2,  # scale
             torch.rand(n, generator=generator) < 0.25,  # erase
             (torch.rand(n, 2, generator=generator) * size * 0.75).long())  # erased square's corner
    offsets, flip, angle, scale, erase, corners = (draw[part].to(images.device) for draw in draws)
    padded = F.pad(images[part].float().div(255).unsqueeze(1), (4, 4, 4, 4), mode="replicate")[:, 0]
    rows, cols = (offsets[:, axis, None] + torch.arange(48, device=images.device) for axis in (0, 1))
    x = padded[torch.arange(len(padded), device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = torch.where(flip[:, None, None], x.flip(-1), x).unsqueeze(1)
    theta = torch.zeros(len(x), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    x = F.grid_sample(x, F.affine_grid(theta, (len(x), 1, size, size), align_corners=False), padding_mode="border",
                      align_corners=False)
    pixels = torch.arange(size, device=images.device)
    in_rows, in_cols = ((pixels >= corners[:, axis, None]) & (pixels < corners[:, axis, None] + size // 4)
                        for axis in (0, 1))
    square = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    x = torch.where(square[:, None], 0.5, x)
    return (x - 0.5) / 0.25
