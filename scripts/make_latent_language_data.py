"""Write probes/data/latent_language_fr_de.jsonl and latent_language_fr_es.jsonl: five-shot word translation
prompts in the style of Wendler et al. 2024 (French → German, French → Spanish, English as the pivot).

The word list is ours. Each query gets five other words of the list as demonstrations (seeded), so the
prompt never shows its own answer. Run from the repository root: python scripts/make_latent_language_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# french, german, spanish, english (extra English / target words after '|' are aliases)
WORDS = """\
fleur Blume flor flower
chien Hund perro dog
chat Katze gato cat
maison Haus casa house|home
livre Buch libro book
arbre Baum árbol tree
eau Wasser agua water
feu Feuer fuego fire
soleil Sonne sol sun
lune Mond luna moon
étoile Stern estrella star
pomme Apfel manzana apple
pain Brot pan bread
lait Milch leche milk
oiseau Vogel pájaro bird
poisson Fisch pez fish
cheval Pferd caballo horse
vache Kuh vaca cow
cochon Schwein cerdo pig
souris Maus ratón mouse
pied Fuß pie foot
tête Kopf cabeza head
œil Auge ojo eye
oreille Ohr oreja ear
bouche Mund boca mouth
nez Nase nariz nose
cœur Herz corazón heart
sang Blut sangre blood
os Knochen hueso bone
dent Zahn diente tooth
cheveux Haare pelo|cabello hair
porte Tür puerta door
fenêtre Fenster ventana window
table Tisch mesa table
chaise Stuhl silla chair
lit Bett cama bed
clé Schlüssel llave key
voiture Auto coche|carro car
route Straße camino|carretera road|street
ville Stadt ciudad city|town
village Dorf pueblo village
montagne Berg montaña mountain
rivière Fluss río river
mer Meer mar sea
lac See lago lake
forêt Wald bosque forest|woods
neige Schnee nieve snow
pluie Regen lluvia rain
nuage Wolke nube cloud
ciel Himmel cielo sky
terre Erde tierra earth|soil
pierre Stein piedra stone|rock
sable Sand arena sand
or Gold oro gold
fer Eisen hierro iron
bois Holz madera wood
verre Glas vidrio glass
sel Salz sal salt
sucre Zucker azúcar sugar
œuf Ei huevo egg
viande Fleisch carne meat
fromage Käse queso cheese
beurre Butter mantequilla butter
vin Wein vino wine
bière Bier cerveza beer
jour Tag día day
nuit Nacht noche night
matin Morgen mañana morning
semaine Woche semana week
mois Monat mes month
année Jahr año year
hiver Winter invierno winter
été Sommer verano summer
homme Mann hombre man
femme Frau mujer woman
enfant Kind niño child|kid
garçon Junge chico|muchacho boy
fille Mädchen chica|muchacha girl
père Vater padre father|dad
mère Mutter madre mother|mom
frère Bruder hermano brother
sœur Schwester hermana sister
ami Freund amigo friend
roi König rey king
reine Königin reina queen
église Kirche iglesia church
école Schule escuela school
jardin Garten jardín garden
cuisine Küche cocina kitchen
mur Wand pared wall
toit Dach techo roof
pont Brücke puente bridge
bateau Schiff barco boat|ship
rouge rot rojo red
vert grün verde green
bleu blau azul blue
jaune gelb amarillo yellow
noir schwarz negro black
blanc weiß blanco white
grand groß grande big|large|tall
petit klein pequeño small|little
vieux alt viejo old
nouveau neu nuevo new
chaud heiß caliente hot|warm
froid kalt frío cold
rapide schnell rápido fast|quick
lent langsam lento slow
fort stark fuerte strong
heureux glücklich feliz happy
deux zwei dos two
trois drei tres three
quatre vier cuatro four
cinq fünf cinco five
sept sieben siete seven
huit acht ocho eight
dix zehn diez ten
cent hundert cien hundred
chanson Lied canción song
mot Wort palabra word
travail Arbeit trabajo work|job
guerre Krieg guerra war
paix Frieden paz peace
mort Tod muerte death
vie Leben vida life
temps Zeit tiempo time
monde Welt mundo world
ours Bär oso bear
loup Wolf lobo wolf
renard Fuchs zorro fox
lapin Hase|Kaninchen conejo rabbit
serpent Schlange serpiente snake
araignée Spinne araña spider
abeille Biene abeja bee
mouche Fliege mosca fly
grenouille Frosch rana frog
couteau Messer cuchillo knife
cuillère Löffel cuchara spoon
fourchette Gabel tenedor fork
assiette Teller plato plate
bouteille Flasche botella bottle
chemise Hemd camisa shirt
chaussure Schuh zapato shoe
chapeau Hut sombrero hat
manteau Mantel abrigo coat
oignon Zwiebel cebolla onion
carotte Karotte zanahoria carrot
cerise Kirsche cereza cherry
poire Birne pera pear
noix Nuss nuez nut
champ Feld campo field
herbe Gras hierba grass
feuille Blatt hoja leaf
racine Wurzel raíz root
graine Samen semilla seed
"""

PAIRS = {"de": ("Deutsch", 1), "es": ("Español", 2)}
SHOTS = 5


def rows(lang: str, seed: int = 0) -> list[dict]:
    name, col = PAIRS[lang]
    table = [line.split() for line in WORDS.strip().splitlines()]
    rng = random.Random(seed)
    out = []
    for i, cols in enumerate(table):
        source, targets, pivots = cols[0], cols[col].split("|"), cols[3].split("|")
        shots = rng.sample([j for j in range(len(table)) if j != i], SHOTS)
        lines = [f'Français: "{table[j][0]}" - {name}: "{table[j][col].split("|")[0]}"' for j in shots]
        lines.append(f'Français: "{source}" - {name}: "')
        row = {"prompt": "\n".join(lines), "target": targets[0], "pivot": pivots[0]}
        if targets[1:]:
            row["target_aliases"] = targets[1:]
        if pivots[1:]:
            row["pivot_aliases"] = pivots[1:]
        out.append(row)
    return out


if __name__ == "__main__":
    for lang in PAIRS:
        path = Path("probes/data") / f"latent_language_fr_{lang}.jsonl"
        data = rows(lang)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        print(f"wrote {path} ({len(data)} rows)")
