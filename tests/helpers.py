"""Small models and loaders shared by the tests."""
import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes=4, inplace=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.act = nn.SiLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(5 * 4, 7)
        self.fc2 = nn.Linear(7, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.act(self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class TinyMLP(nn.Module):
    def __init__(self, d_in=5, hidden=9, num_classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def image_loader(n=24, classes=4, size=8, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    return batches(x, y, bs)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "mode": {n: m.training for n, m in model.named_modules()},
        "grad": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
    }


def assert_same(model, snap):
    now = snapshot(model)
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
    assert now["req"] == snap["req"], "requires_grad flags changed"
    assert now["mode"] == snap["mode"], "train/eval mode changed"
    for k, v in snap["grad"].items():
        w = now["grad"][k]
        assert (v is None) == (w is None) and (v is None or torch.equal(v, w)), f"{k}.grad changed"


def count_macs(model, x):
    """Conv/Linear MACs of one forward on x (batch 1): weight numel x output positions."""
    total = [0]

    def hook(m, i, o):
        units = o.shape[1] if isinstance(m, nn.Conv2d) else o.shape[-1]
        total[0] += m.weight.numel() * (o.numel() // (o.shape[0] * units))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0]
