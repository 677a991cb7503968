"""branchspec: how neural networks divide their work among their parts.

Branch specialization (Brokman & Gilboa, 2022) and architecture disentanglement (NAD; Hu et al., 2021).
"""

from branchspec.branched import Branched, BranchedOutput
from branchspec.errors import BranchspecError
from branchspec.parts import Parts, parts_of

__version__ = "0.1.0"

__all__ = ["Branched", "BranchedOutput", "BranchspecError", "Parts", "parts_of", "__version__"]
