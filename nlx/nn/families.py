"""Imports every family module of the zoo so that each registers itself (``nlx.nn.registry``)."""

# pylint: disable=unused-import
from nlx.nn import (attention, deltanet, gated_deltanet, hope, mamba2, retnet, samba, titans,
                    ttt)
