from rmjax.models.llama import Llama, LlamaConfig
from rmjax.models.reward import RewardModel, last_token_index
