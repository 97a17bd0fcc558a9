"""Reference for word-stress: character n-grams (1-5) of the word with start/end markers, TF-IDF,
a class-balanced linear SVM; trained on train + valid.

Run: python reference.py   (prints the validation macro F1 of a train-only fit, writes submission.csv)
"""
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
marked = lambda words: "<" + words + ">"  # so n-grams can anchor on prefixes and suffixes
model = lambda: make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 5), sublinear_tf=True),
                              LinearSVC(C=0.5, class_weight="balanced"))

m = model().fit(marked(train["word"]), train["stress"])
print(f"validation macro_f1: {f1_score(valid['stress'], m.predict(marked(valid['word'])), average='macro'):.4f}")
both = pd.concat([train, valid])
m = model().fit(marked(both["word"]), both["stress"])
pd.DataFrame({"id": test["id"], "stress": m.predict(marked(test["word"]))}).to_csv("submission.csv", index=False)
