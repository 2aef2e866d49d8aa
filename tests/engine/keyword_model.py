"""A model of one keyword input, shared by the tests of data given as dicts (ModelAnalysis, calibrate)."""

from torch import nn


class Features(nn.Module):
    """A model of one keyword input, `features`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, features):
        return self.fc(features)
