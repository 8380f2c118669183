from rmjax.indexing import ReadRows
from rmjax.models.llama import Llama, LlamaConfig
from rmjax.models.reward import RewardModel, last_token_index

__all__ = ["Llama", "LlamaConfig", "ReadRows", "RewardModel", "last_token_index"]
