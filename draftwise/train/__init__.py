"""Everything that trains: the shared pipeline (teacher features extracted once, a resumable
trainer, validation) and one file per trained part (EAGLE head, LDLP, early-exit layer).

Training imports the drafters whose parts it trains (to save them in the format they load);
nothing at run time imports training.
"""
