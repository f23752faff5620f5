"""Model surgery on a source model, below the stages that use it: which layers matter (block
influence), which a drop removes, and keeping the rest as a plain model of its family."""
