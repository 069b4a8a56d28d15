"""text2sql_ray: the Llama text-to-SQL CoT fine-tuning recipe as a Ray pipeline."""

__version__ = "0.1.0"
