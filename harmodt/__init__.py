"""harmodt: HarmoDT (Hu et al., ICML 2024) -- one Prompt-DT policy for many tasks, each acting
through its own learned binary mask over the transformer's weight matrices."""

__version__ = "0.1.0"
