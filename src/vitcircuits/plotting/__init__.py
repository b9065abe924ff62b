"""Plot helpers shared by the analysis figures, the stages and the explorer: matplotlib set-up and
saving (``figures``), and attention maps from a query patch (``attention``). ``report/`` only builds pages."""
