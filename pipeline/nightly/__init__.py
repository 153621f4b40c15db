"""How a night is scored and published: a version's scorer (`scorer`), Ray Data's decode -> score -> heatmap
stages (`stages`), the score row's one home (`score_table`), the night's atomic publish and locations (`nights`),
its report (`report`), and the scoring run top to bottom (`run`)."""
