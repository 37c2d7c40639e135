"""Pure-functional Flax Linen modules: embeddings, attention, layers, encoder, heads."""

from jaxlm.models.config import ModelConfig
from jaxlm.models.encoder import Encoder, EncoderOutput
from jaxlm.models.heads import MlmHead, NspHead
from jaxlm.models.pretrainer import Pretrainer
